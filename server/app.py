"""The Litestar application: the controllers, their dependencies, error mapping, the checks every request passes
(:mod:`alignd.api.checks`), metrics middleware, and a lifespan that opens the app's services (:mod:`alignd.services`)
for as long as the app runs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.metadata import version
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from alignd.api.admin import KeyController
from alignd.api.chat import ChatController, ready_chat
from alignd.api.checks import request_checks
from alignd.api.feedback import FeedbackController
from alignd.api.health import HealthController
from alignd.api.plugins import PluginController
from alignd.api.policies import PolicyController
from alignd.api.privacy import RetentionController, UserController
from alignd.api.training import TrainingController
from alignd.api.web import web_router
from alignd.auth import user_guard
from alignd.cluster import Role
from alignd.config import ConfigError, Settings
from alignd.errors import AlignError, DatabaseUnavailable
from alignd.feedback.manager import AlignPluginManager, collect_routes, make_plugin_manager
from alignd.protocol import ErrorDetail, ErrorResponse
from alignd.services import Services, open_services
from alignd.store import Store
from alignd.store.faults import outage

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, engine: Any = None, store: Store | None = None,
               plugins: AlignPluginManager | None = None, role: Role | None = None) -> Litestar:
    """The app for ``settings``. An ``engine`` or ``store`` passed in is used as is and not closed by the app;
    ``plugins`` (a plugin manager) replaces the one built from the settings. ``role="trainer"`` (``alignd trainer``)
    serves only ``/health``, ``/ready`` and ``/metrics``. A start refused by a configuration check leaves its
    message in ``app.state.startup_error``."""
    plugin_routes_added = False

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nonlocal plugin_routes_added
        # Plugins first: a broken or conflicting plugin stops the start before anything is opened.
        pm = plugins if plugins is not None else make_plugin_manager(settings)
        plugin_routes = collect_routes(pm) if role != "trainer" else []
        async with AsyncExitStack() as stack:
            try:
                services = await stack.enter_async_context(
                    open_services(settings, engine=engine, store=store, plugins=pm, role=role))
            except ConfigError as e:  # the CLI prints it and exits 2
                app.state.startup_error = str(e)
                raise
            app.state.services = services
            app.state.feedback = services.feedback  # how plugin routes stored feedback before they could ask for it
            if not plugin_routes_added:  # Litestar refuses a route twice, should this app be started again
                for router in plugin_routes:
                    app.register(router)
                plugin_routes_added = True
            yield

    handlers: list[Any] = [HealthController] if role == "trainer" else [
        ChatController, FeedbackController, PolicyController, TrainingController, PluginController, KeyController,
        UserController, RetentionController, HealthController, web_router()]
    return Litestar(
        route_handlers=handlers,
        dependencies={"chat": Provide(ready_chat, sync_to_thread=False),
                      **{name: Provide(_service(name), sync_to_thread=False) for name in _PROVIDED}},
        lifespan=[lifespan],
        exception_handlers={AlignError: _align_error, HTTPException: _http_error, Exception: _unexpected_error},
        middleware=[_metrics_middleware, request_checks],  # the first is outermost: it counts what the checks refuse
        request_max_body_size=settings.server.max_body_bytes,  # every route's, as its body arrives
        # The schema maps every API route (not its own pages): reading it takes the key that /v1/* takes.
        openapi_config=OpenAPIConfig(title="alignd", version=version("alignd"),
                                     openapi_router=Router("/schema", route_handlers=[], guards=[user_guard],
                                                           include_in_schema=False)),
        debug=False,
    )


# Services a handler (a plugin's too) receives by naming a parameter after one of them (and ``chat``, which is a 503
# until the engine is up).
_PROVIDED = ("services", "settings", "feedback", "registry", "trainer", "canary", "router", "metrics", "plugins",
             "privacy")


def _service(name: str) -> Any:
    def provide(request: Request[Any, Any, Any]) -> Any:
        services: Services = request.app.state.services
        return services if name == "services" else getattr(services, name)

    return provide


# --- errors ------------------------------------------------------------------------------------------------------


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> Response[ErrorResponse]:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    return Response(body, status_code=status, headers=headers)


def _align_error(request: Request[Any, Any, Any], exc: AlignError) -> Response[ErrorResponse]:
    if isinstance(exc, DatabaseUnavailable):
        request.app.state.services.metrics.database_errors.labels(exc.reason).inc()
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorResponse]:
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    return _error_response(exc.status_code, str(exc.detail), kind, code=code,
                           headers=dict(exc.headers) if exc.headers else None)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    if (reason := outage(exc)) is not None:  # the database failing is a 503 to retry through, not a bug
        # The driver's message, not SQLAlchemy's (which repeats the statement and its parameters, texts included).
        log.warning("%s %s: the database failed (%s): %s: %s", request.method, request.url.path, reason,
                    type(exc).__name__, getattr(exc, "orig", None) or exc)
        return _align_error(request, DatabaseUnavailable.of(reason))
    log.error("unhandled error", exc_info=exc)
    return _error_response(500, "Internal server error.", "server_error", code="internal_error")


# --- metrics -----------------------------------------------------------------------------------------------------


def _metrics_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        metrics_ = scope["litestar_app"].state.services.metrics
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics_.in_flight.inc()
        try:
            await app(scope, receive, send_wrapper)
        finally:
            metrics_.in_flight.dec()
            route = scope.get("path_template") or "unmatched"
            metrics_.requests.labels(route, scope["method"], str(status)).inc()
            metrics_.request_latency.labels(route).observe(time.perf_counter() - started)

    return middleware
