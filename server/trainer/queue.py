"""Training runs on a serving replica (``alignd serve --trainer off``), which never trains: a run an operator requests
is recorded in the database as ``queued``, with its request, and the ``alignd trainer`` process takes queued runs
first in, first out (:meth:`alignd.trainer.supervisor.TrainerSupervisor.take_queued`). Reads and cancelling a
queued run work from any replica: they only touch the database. This module imports no torch."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

import msgspec

from alignd.errors import Conflict, NotFound, Unavailable
from alignd.policies.router import PolicyRouter
from alignd.protocol import TrainingRun, TrainingRunList, TrainingRunRequest
from alignd.store import RunRow, Store
from alignd.trainer.config import TrainerConfig
from alignd.trainer.supervisor import signal_refusal, wire_run

__all__ = ["RunQueue", "TrainingRuns", "queued_request"]


@runtime_checkable  # Litestar checks a dependency against its annotation with isinstance
class TrainingRuns(Protocol):
    """What the app asks of its training-run service: the supervisor (it trains) or a replica's queue."""

    async def open(self) -> None: ...
    def begin_shutdown(self) -> None: ...
    async def close(self) -> None: ...
    async def start(self, request: TrainingRunRequest, trigger: str = "manual") -> TrainingRun: ...
    async def list(self, limit: int = 50) -> TrainingRunList: ...
    async def get(self, run_id: str) -> TrainingRun: ...
    async def cancel(self, run_id: str) -> TrainingRun: ...


def queued_request(row: RunRow) -> TrainingRunRequest:
    """The request a queued run was recorded with."""
    return msgspec.convert(row.config.get("request") or {}, TrainingRunRequest)


class RunQueue:
    """The training-run service of a serving replica: the same calls as the supervisor's, through the database."""

    def __init__(self, store: Store, router: PolicyRouter, config: Callable[[TrainingRunRequest], TrainerConfig],
                 instance: str) -> None:
        self.store = store
        self.router = router
        self.config = config
        self.instance = instance
        self.stopping = False

    async def open(self) -> None:
        """Nothing to start: this replica runs no trainer and never takes the trainer lease."""

    def begin_shutdown(self) -> None:
        self.stopping = True

    async def close(self) -> None:
        self.begin_shutdown()

    async def start(self, request: TrainingRunRequest, trigger: str = "manual") -> TrainingRun:
        """Queue a run for the trainer process; 409 when there is nothing to train on."""
        if self.stopping:
            raise Unavailable("The server is shutting down.", code="shutting_down")
        config = self.config(request)  # a request the trainer would refuse is refused here, before it is queued
        if (refusal := await signal_refusal(self.store, config.objective)) is not None:
            raise refusal
        row = RunRow(id=f"run-{uuid.uuid4().hex[:12]}", status="queued", phase="starting", progress=0.0,
                     trigger=trigger, parent=self.router.promoted, candidate=None, promoted=False,
                     config={"request": msgspec.to_builtins(request), "queued_by": self.instance}, metrics={},
                     error=None, created=datetime.now(UTC), finished=None)
        await self.store.insert_run(row)
        return wire_run(row)

    async def list(self, limit: int = 50) -> TrainingRunList:
        return TrainingRunList(data=[wire_run(r) for r in await self.store.list_runs(limit)])

    async def get(self, run_id: str) -> TrainingRun:
        row = await self.store.get_run(run_id)
        if row is None:
            raise NotFound(f"There is no training run '{run_id}'.", param="id", code="run_not_found")
        return wire_run(row)

    async def cancel(self, run_id: str) -> TrainingRun:
        """Cancel a queued run (it never starts); a running one belongs to the trainer process: 409."""
        if await self.store.end_queued_run(run_id, "cancelled", "cancelled by an operator", datetime.now(UTC)):
            return await self.get(run_id)
        run = await self.get(run_id)  # 404 for an unknown id
        raise Conflict(f"Training run {run_id} is {run.status}, not queued: only a queued run can be cancelled on a "
                       "serving replica (a running one belongs to the alignd trainer process).",
                       code="run_not_queued")
