"""The Litestar application: routes, error mapping, metrics middleware, and a lifespan that owns the resources.

The HTTP server listens as soon as the store is open; the engine starts in the background (tens of seconds), with
``/ready`` and chat answering 503 until it is up, so that orchestrators can tell "alive" from "ready".
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from alignd.api.chat import chat_completions, list_models
from alignd.api.feedback import create_feedback, export_feedback, feedback_stats, list_feedback
from alignd.api.health import health, metrics, ready
from alignd.api.plugins import list_plugins
from alignd.api.policies import get_policy, list_policies, promote_policy, rollback_policy
from alignd.api.training import cancel_run, get_run, list_runs, start_run
from alignd.api.web import web_router
from alignd.auth import KeyChecker, user_guard
from alignd.chat import ChatService
from alignd.config import ConfigError, Settings
from alignd.errors import AlignError, Unavailable
from alignd.feedback.manager import collect_feedback_kinds, collect_routes, make_plugin_manager
from alignd.feedback.service import FeedbackService
from alignd.metrics import Metrics
from alignd.policies.registry import PolicyRegistry
from alignd.policies.router import PolicyRouter
from alignd.protocol import ErrorDetail, ErrorResponse
from alignd.store import Store
from alignd.trainer.config import trainer_config
from alignd.trainer.supervisor import TrainerSupervisor, TriggerPolicy, default_threads

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, engine: Any = None, store: Store | None = None, plugins: Any = None) -> Litestar:
    """The app for ``settings``. An ``engine`` or ``store`` passed in is used as is and not closed by the app;
    ``plugins`` (a plugin manager) replaces the one built from the settings."""
    routes_registered = False

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        state.settings = settings
        state.metrics = Metrics()
        state.key_checker = KeyChecker(settings.server.api_keys, settings.server.admin_keys)
        state.engine = None
        state.chat = None
        state.trainer = None
        state.engine_error = None
        state.stopping = False
        state.feedback = None
        # Plugins first: a broken or conflicting plugin stops the start before anything is opened.
        state.plugins = plugins if plugins is not None else make_plugin_manager(settings)
        kinds, plugin_routes = collect_feedback_kinds(state.plugins), collect_routes(state.plugins)
        own_store = store is None
        state.store = store or await Store.open(settings.database_url, batch_max=settings.store.batch_max)
        starter: asyncio.Task[None] | None = None
        follower: asyncio.Task[None] | None = None
        try:
            state.feedback = FeedbackService(state.store, state.plugins, state.metrics, settings, kinds=kinds)
            await state.feedback.start()
            _register_once(app, plugin_routes)
            state.router = PolicyRouter(settings.served_name,
                                        lambda: state.engine.loaded_versions if state.engine is not None else [0])
            state.registry = PolicyRegistry(state.store, state.router, state.metrics, settings.data_path / "policies",
                                            max_rank=settings.engine.max_lora_rank,
                                            keep_loaded=settings.engine.max_loras - 1)  # one slot for rollouts
            state.trainer = _make_trainer(state)
            await state.trainer.open()
            if not state.store.embedded and settings.store.policy_sync_s > 0:  # replicas share PostgreSQL
                follower = asyncio.create_task(_follow_promotions(state), name="alignd-policy-sync")
            if engine is not None:
                await _attach_engine(state, engine)
            else:
                starter = asyncio.create_task(_start_engine(state))
            _settle_gc()
            yield
        finally:
            state.stopping = True
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            if state.trainer is not None:
                await state.trainer.close()
            if starter is not None and not starter.done():
                starter.cancel()  # waits for a half-started engine and shuts it down (see VLLMEngine.start)
                await asyncio.gather(starter, return_exceptions=True)
            if state.feedback is not None:
                await state.feedback.close()
            if own_store:
                await state.store.close()
            if engine is None and state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    async def _start_engine(state: Any) -> None:
        from alignd.engine.vllm_engine import VLLMEngine

        model = resolve_model(settings)
        try:
            await _attach_engine(state, await VLLMEngine.start(model, settings.engine))
            log.info("engine ready: %s (context %d)", model, state.engine.max_model_len)
            _settle_gc()
        except Exception as e:
            state.engine_error = f"{type(e).__name__}: {e}"
            log.critical("the engine failed to start, stopping: %s", state.engine_error)
            os.kill(os.getpid(), signal.SIGTERM)

    def _register_once(app: Litestar, routers: list[Router]) -> None:
        nonlocal routes_registered  # Litestar refuses a route twice should this app be started again
        if not routes_registered:
            for router in routers:
                app.register(router)
            routes_registered = True

    async def _attach_engine(state: Any, eng: Any) -> None:
        await state.registry.bootstrap(eng)  # the promoted version is loaded before chat opens
        state.engine = eng
        state.chat = ChatService(eng, state.router, state.store, state.metrics, max_n=settings.server.max_n)

    async def _follow_promotions(state: Any) -> None:
        while True:
            await asyncio.sleep(settings.store.policy_sync_s)
            try:
                await state.registry.follow()
            except Exception:  # the database may be briefly away; try again next time
                log.exception("checking for promotions by other replicas failed")

    def _make_trainer(state: Any) -> TrainerSupervisor:
        t = settings.trainer
        if t.lora_rank > settings.engine.max_lora_rank:
            raise ConfigError(f"trainer.lora_rank ({t.lora_rank}, --lora-rank) exceeds engine.max_lora_rank "
                              f"({settings.engine.max_lora_rank}, --max-lora-rank): the engine could not serve it")
        trigger = TriggerPolicy(auto=t.training_trigger == "auto", min_new_pairs=t.min_new_pairs,
                                min_new_labels=t.min_new_labels, min_interval_s=t.min_interval_s)
        return TrainerSupervisor(state.store, state.registry, state.metrics, base_model=lambda: resolve_model(settings),
                                 database_url=settings.database_url, runs_dir=settings.data_path / "runs",
                                 config=lambda request: trainer_config(t, request),
                                 threads=t.trainer_threads or default_threads(), trigger=trigger,
                                 run_timeout_s=t.run_timeout_s)

    v1 = Router("/", route_handlers=[chat_completions, list_models], guards=[user_guard, _engine_ready_guard])
    app = Litestar(
        # Feedback needs only the store: it is answered while the engine still loads.
        route_handlers=[v1, create_feedback, list_feedback, export_feedback, feedback_stats, list_plugins, health,
                        ready, metrics, list_policies, get_policy, promote_policy, rollback_policy, start_run,
                        list_runs, get_run, cancel_run, web_router()],
        lifespan=[lifespan],
        exception_handlers={AlignError: _align_error, HTTPException: _http_error, Exception: _unexpected_error},
        middleware=[_metrics_middleware],
        request_max_body_size=None,  # the handlers enforce the configured limit with an OpenAI-shaped 413
        debug=False,
    )
    app.state.plugins = plugins
    return app


def resolve_model(settings: Settings) -> str:
    """The configured model, or the demo model (built into the data dir the first time, with a progress bar)."""
    if settings.model:
        return settings.model
    from alignd.demo.build import ensure_demo_model

    return str(ensure_demo_model(settings.data_path / "models"))


def _settle_gc() -> None:
    """Take what start-up built (modules, the engine's objects, caches) out of the cyclic collector's view, and
    collect young objects less often: full collections over them paused requests for tens of milliseconds
    (feedback p99 70 ms -> 30 ms in bench/feedback.py)."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 50_000), max(gen1, 50), max(gen2, 100))


async def _engine_ready_guard(connection: Any, _: Any) -> None:
    if connection.app.state.chat is None:
        detail = connection.app.state.engine_error
        raise Unavailable(f"The engine failed to start: {detail}" if detail else
                          "The model is still loading; retry shortly.", headers={"Retry-After": "5"})


# --- errors ------------------------------------------------------------------------------------------------------


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> Response[ErrorResponse]:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    return Response(body, status_code=status, headers=headers)


def _align_error(_: Request[Any, Any, Any], exc: AlignError) -> Response[ErrorResponse]:
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorResponse]:
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    return _error_response(exc.status_code, str(exc.detail), kind, code=code,
                           headers=dict(exc.headers) if exc.headers else None)


def _unexpected_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    log.error("unhandled error", exc_info=exc)
    return _error_response(500, "Internal server error.", "server_error", code="internal_error")


# --- metrics -----------------------------------------------------------------------------------------------------


def _metrics_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        metrics_: Metrics = scope["litestar_app"].state.metrics
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

