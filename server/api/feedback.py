"""``POST /v1/feedback`` (API key), ``GET /v1/feedback``, ``GET /v1/feedback/export`` and ``GET /v1/feedback/stats``
(admin key): thin handlers over the feedback service. None of them needs the engine."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Stream

from alignd.api.body import read_body
from alignd.auth import admin_guard, user_guard
from alignd.decoding import convert, decode
from alignd.errors import Unprocessable
from alignd.feedback.service import FeedbackService
from alignd.protocol import (
    ExportQuery,
    FeedbackCreated,
    FeedbackList,
    FeedbackQuery,
    FeedbackStats,
    FeedbackStatsQuery,
)


@post("/v1/feedback", status_code=201, guards=[user_guard])
async def create_feedback(request: Request[Any, Any, Any]) -> Response[FeedbackCreated]:
    state = request.app.state
    service: FeedbackService = state.feedback
    body = decode(await read_body(request, state.settings.server.max_body_bytes), dict[str, Any])
    created, replayed = await service.submit(body, idempotency_key=request.headers.get("idempotency-key"))
    return Response(created, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)


@get("/v1/feedback", guards=[admin_guard])
async def list_feedback(request: Request[Any, Any, Any]) -> FeedbackList:
    service: FeedbackService = request.app.state.feedback
    return await service.list_feedback(convert(_query(request), FeedbackQuery, invalid=Unprocessable, strict=False))


@get("/v1/feedback/export", guards=[admin_guard])
async def export_feedback(request: Request[Any, Any, Any]) -> Stream:
    service: FeedbackService = request.app.state.feedback
    query = convert(_query(request), ExportQuery, invalid=Unprocessable, strict=False)
    return Stream(service.export(query), media_type="application/x-ndjson",
                  headers={"Content-Disposition": f'attachment; filename="alignd-{query.format}.jsonl"'})


@get("/v1/feedback/stats", guards=[admin_guard])
async def feedback_stats(request: Request[Any, Any, Any]) -> FeedbackStats:
    service: FeedbackService = request.app.state.feedback
    return await service.stats(convert(_query(request), FeedbackStatsQuery, invalid=Unprocessable, strict=False))


def _query(request: Request[Any, Any, Any]) -> dict[str, str]:
    # The last value of a repeated parameter wins.
    return {name: values[-1] for name, values in request.query_params.dict().items()}
