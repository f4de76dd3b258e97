"""``POST /v1/feedback`` (API key; a ``user`` or ``frontend`` key judges its own completions only),
``GET /v1/feedback``, ``GET /v1/feedback/export`` and ``GET /v1/feedback/stats``
(admin key): thin handlers over the feedback service. None of them needs the engine."""

from __future__ import annotations

from typing import Any, TypeVar

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.response import Stream

from alignd.api.body import read_body
from alignd.api.openapi import ADMIN, USER, documented, json_lines
from alignd.auth import admin_guard, principal_of, user_guard
from alignd.config import Settings
from alignd.decoding import convert_query, decode
from alignd.errors import Unprocessable
from alignd.feedback.service import FeedbackService
from alignd.protocol import (
    ExportQuery,
    FeedbackCreated,
    FeedbackEvent,
    FeedbackList,
    FeedbackQuery,
    FeedbackRequest,
    FeedbackStats,
    FeedbackStatsQuery,
    KTOLine,
    PreferenceLine,
)

Q = TypeVar("Q")


class FeedbackController(Controller):
    # Guards per handler here: clients post where operators list (one path cannot be split across controllers).
    path = "/v1/feedback"

    @post("/", status_code=201, guards=[user_guard],
          **documented(body=FeedbackRequest, errors=(*USER, 403, 404, 409)))
    async def create_feedback(self, request: Request[Any, Any, Any], feedback: NamedDependency[FeedbackService],
                              settings: NamedDependency[Settings]) -> Response[FeedbackCreated]:
        body = decode(await read_body(request, settings.server.max_body_bytes), dict[str, Any])
        created, replayed = await feedback.submit(body, idempotency_key=request.headers.get("idempotency-key"),
                                                  principal=principal_of(request))
        return Response(created, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @get("/", guards=[admin_guard], **documented(query=FeedbackQuery, errors=(*ADMIN, 422)))
    async def list_feedback(self, request: Request[Any, Any, Any],
                            feedback: NamedDependency[FeedbackService]) -> FeedbackList:
        return await feedback.list_feedback(_query(request, FeedbackQuery))

    @get("/export", guards=[admin_guard],
          **documented(query=ExportQuery, errors=(*ADMIN, 422),
                       streams=json_lines(PreferenceLine, KTOLine, FeedbackEvent)))
    async def export_feedback(self, request: Request[Any, Any, Any],
                              feedback: NamedDependency[FeedbackService]) -> Stream:
        query = _query(request, ExportQuery)
        return Stream(await feedback.export(query), media_type="application/x-ndjson",
                      headers={"Content-Disposition": f'attachment; filename="alignd-{query.format}.jsonl"'})

    @get("/stats", guards=[admin_guard], **documented(query=FeedbackStatsQuery, errors=(*ADMIN, 422)))
    async def feedback_stats(self, request: Request[Any, Any, Any],
                             feedback: NamedDependency[FeedbackService]) -> FeedbackStats:
        return await feedback.stats(_query(request, FeedbackStatsQuery))


def _query(request: Request[Any, Any, Any], type_: type[Q]) -> Q:
    """The query string as ``type_`` (a 422 naming the parameter); the last value of a repeated parameter wins."""
    values = {name: values[-1] for name, values in request.query_params.dict().items()}
    return convert_query(values, type_, invalid=Unprocessable)
