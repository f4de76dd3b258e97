"""``POST /v1/chat/completions`` and ``GET /v1/models``: thin handlers over the chat service."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Stream

from alignd.api.body import read_body
from alignd.chat import ChatService
from alignd.decoding import decode
from alignd.protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[ChatCompletion] | Stream:
    state = request.app.state
    service: ChatService = state.chat
    chat_request = decode(await read_body(request, state.settings.server.max_body_bytes), ChatCompletionRequest)
    prepared = service.prepare(chat_request)
    if chat_request.stream:
        # Litestar cancels the iterator when the client disconnects, which aborts the engine request.
        return Stream(service.stream(prepared), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(await _unless_disconnected(request, service.complete(prepared)))


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


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    router = request.app.state.router
    return ModelList(data=[ModelCard(id=name) for name in router.model_names()])
