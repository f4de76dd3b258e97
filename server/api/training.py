"""Operator endpoints for training runs (admin key): start, list, follow, cancel."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import Parameter
from litestar.params import FromPath

from alignd.api.body import read_body
from alignd.api.openapi import ADMIN, documented
from alignd.auth import admin_guard
from alignd.config import Settings
from alignd.decoding import decode
from alignd.errors import InvalidRequest
from alignd.protocol import TrainingRun, TrainingRunList, TrainingRunRequest
from alignd.trainer.queue import TrainingRuns

LIMIT = Parameter(name="limit", param_in="query", required=False, description="How many runs, newest first.",
                  schema={"type": "integer", "minimum": 1, "maximum": 1000, "default": 50})


class TrainingController(Controller):
    path = "/v1/training/runs"
    guards = (admin_guard,)

    @post("/", status_code=202,
          **documented(body=TrainingRunRequest, body_optional=True, errors=(*ADMIN, 409, 503)))
    async def start_run(self, request: Request[Any, Any, Any], trainer: NamedDependency[TrainingRuns],
                        settings: NamedDependency[Settings]) -> Response[TrainingRun]:
        body = await read_body(request, settings.server.max_body_bytes)
        run_request = decode(body, TrainingRunRequest) if body.strip() else TrainingRunRequest()
        return Response(await trainer.start(run_request), status_code=202)

    @get("/", **documented(parameters=[LIMIT], errors=(*ADMIN, 400)))
    async def list_runs(self, request: Request[Any, Any, Any],
                        trainer: NamedDependency[TrainingRuns]) -> TrainingRunList:
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise InvalidRequest("'limit' must be an integer from 1 to 1000.", param="limit")
        return await trainer.list(int(raw))

    @get("/{run_id:str}", **documented(errors=(*ADMIN, 404)))
    async def get_run(self, trainer: NamedDependency[TrainingRuns], run_id: FromPath[str]) -> TrainingRun:
        return await trainer.get(run_id)

    @post("/{run_id:str}/cancel", status_code=200, **documented(errors=(*ADMIN, 404, 409)))
    async def cancel_run(self, trainer: NamedDependency[TrainingRuns], run_id: FromPath[str]) -> TrainingRun:
        return await trainer.cancel(run_id)
