"""``POST /v1/chat/completions`` and ``GET /v1/models`` (API key): thin handlers over the chat service. They answer
503 while the engine loads (or after it failed to start). Chat requests count against their caller's limits
(:mod:`alignd.limits`) for as long as they run."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers import BaseRouteHandler
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Scope, Send

from alignd.api.body import read_body
from alignd.api.checks import error_response
from alignd.api.openapi import USER, documented, sse_events
from alignd.auth import limits_caller, principal_of, user_guard
from alignd.chat import ChatService
from alignd.config import Settings
from alignd.decoding import decode
from alignd.errors import RateLimited, Unavailable
from alignd.policies.router import PolicyRouter
from alignd.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ModelCard, ModelList
from alignd.services import Services


def ready_chat(services: NamedDependency[Services]) -> ChatService:
    """The chat service, or a 503 with ``Retry-After`` while there is none."""
    if services.chat is None:
        raise Unavailable(f"The engine failed to start: {services.engine_error}" if services.engine_error else
                          "The model is still loading; retry shortly.", headers={"Retry-After": "5"})
    return services.chat


async def engine_ready_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard: the 503 of :func:`ready_chat` before anything else is done for the request."""
    ready_chat(connection.app.state.services)


def caller_limits(app: ASGIApp) -> ASGIApp:
    """Middleware of the chat route: admit the request under its caller's rate and concurrency limits (else a 429)
    and hold its slot until the response's last byte is sent or the client is gone. It runs before the guards, so a
    request that they will refuse (no valid key, engine not up) is let through to them uncounted."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope)
        services: Services = connection.app.state.services
        limits = services.chat_limits
        caller = await limits_caller(connection) if limits.enabled and services.chat is not None else None
        if caller is None:
            await app(scope, receive, send)
            return
        try:
            lease = limits.admit(caller)
        except RateLimited as e:
            await error_response(e)(scope, receive, send)
            return
        with lease:
            await app(scope, receive, send)

    return middleware


class ChatController(Controller):
    path = "/v1"
    guards = (user_guard, engine_ready_guard)

    @post("/chat/completions", status_code=200, middleware=[caller_limits],
          **documented(body=ChatCompletionRequest, errors=(*USER, 404, 429, 503),
                        returns=ChatCompletion, streams=sse_events(ChatCompletionChunk)))
    async def chat_completions(self, request: Request[Any, Any, Any], chat: NamedDependency[ChatService],
                               settings: NamedDependency[Settings]) -> Response[ChatCompletion] | Stream:
        body = await read_body(request, settings.server.max_body_bytes)
        prepared = chat.prepare(decode(body, ChatCompletionRequest), principal_of(request))
        if prepared.request.stream:
            # Litestar cancels the iterator when the client disconnects, which aborts the engine request.
            return Stream(chat.stream(prepared), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return Response(await _unless_disconnected(request, chat.complete(prepared)))

    @get("/models", **documented(errors=(*USER, 503)))
    async def list_models(self, router: NamedDependency[PolicyRouter]) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in router.model_names()])


async def _unless_disconnected(request: Request[Any, Any, Any], work: Any) -> Any:
    """Run ``work`` but cancel it (aborting the engine request) if the client hangs up first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:  # after the body is read, the next ASGI message is the disconnect
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise asyncio.CancelledError("client disconnected")
    return task.result()
