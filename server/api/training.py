"""Operator endpoints for training runs (admin key): start, list, follow, cancel."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.params import FromPath

from alignd.api.body import read_body
from alignd.auth import admin_guard
from alignd.decoding import decode
from alignd.errors import InvalidRequest
from alignd.protocol import TrainingRun, TrainingRunList, TrainingRunRequest
from alignd.trainer.supervisor import TrainerSupervisor


def _trainer(request: Request[Any, Any, Any]) -> TrainerSupervisor:
    return request.app.state.trainer


@post("/v1/training/runs", guards=[admin_guard])
async def start_run(request: Request[Any, Any, Any]) -> Response[TrainingRun]:
    body = await read_body(request, request.app.state.settings.server.max_body_bytes)
    run_request = decode(body, TrainingRunRequest) if body.strip() else TrainingRunRequest()
    return Response(await _trainer(request).start(run_request), status_code=202)


@get("/v1/training/runs", guards=[admin_guard])
async def list_runs(request: Request[Any, Any, Any]) -> TrainingRunList:
    raw = request.query_params.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidRequest("'limit' must be an integer from 1 to 1000.", param="limit")
    return await _trainer(request).list(int(raw))


@get("/v1/training/runs/{run_id:str}", guards=[admin_guard])
async def get_run(request: Request[Any, Any, Any], run_id: FromPath[str]) -> TrainingRun:
    return await _trainer(request).get(run_id)


@post("/v1/training/runs/{run_id:str}/cancel", status_code=200, guards=[admin_guard])
async def cancel_run(request: Request[Any, Any, Any], run_id: FromPath[str]) -> TrainingRun:
    return await _trainer(request).cancel(run_id)
