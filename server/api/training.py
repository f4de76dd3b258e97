"""Operator endpoints for training runs (admin key): start, list, follow, cancel."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from alignd.api.body import read_body
from alignd.auth import admin_guard
from alignd.config import Settings
from alignd.decoding import decode
from alignd.errors import InvalidRequest
from alignd.protocol import TrainingRun, TrainingRunList, TrainingRunRequest
from alignd.trainer.supervisor import TrainerSupervisor


class TrainingController(Controller):
    path = "/v1/training/runs"
    guards = (admin_guard,)

    @post("/")
    async def start_run(self, request: Request[Any, Any, Any], trainer: NamedDependency[TrainerSupervisor],
                        settings: NamedDependency[Settings]) -> Response[TrainingRun]:
        body = await read_body(request, settings.server.max_body_bytes)
        run_request = decode(body, TrainingRunRequest) if body.strip() else TrainingRunRequest()
        return Response(await trainer.start(run_request), status_code=202)

    @get("/")
    async def list_runs(self, request: Request[Any, Any, Any],
                        trainer: NamedDependency[TrainerSupervisor]) -> TrainingRunList:
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise InvalidRequest("'limit' must be an integer from 1 to 1000.", param="limit")
        return await trainer.list(int(raw))

    @get("/{run_id:str}")
    async def get_run(self, trainer: NamedDependency[TrainerSupervisor], run_id: FromPath[str]) -> TrainingRun:
        return await trainer.get(run_id)

    @post("/{run_id:str}/cancel", status_code=200)
    async def cancel_run(self, trainer: NamedDependency[TrainerSupervisor], run_id: FromPath[str]) -> TrainingRun:
        return await trainer.cancel(run_id)
