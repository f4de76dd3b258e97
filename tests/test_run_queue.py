"""The queue of training runs between serving replicas and the trainer process (issue 12): the trainer claims a
queued run with one conditional UPDATE (queued -> running, returning the row), so an operator's cancel from a replica
either lands first, and the run never starts, or finds it running; either way the log and the run row say what
happened. On SQLite and PostgreSQL, the replica and the trainer on their own stores."""

# ruff: noqa: F811 - the fixtures are imported from other test modules and used as parameters
from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from alignd.config import TrainerSettings
from alignd.errors import Conflict
from alignd.metrics import Metrics
from alignd.policies.router import PolicyRouter
from alignd.protocol import TrainingRunRequest
from alignd.store import Store
from alignd.trainer.config import trainer_config
from alignd.trainer.queue import RunQueue
from alignd.trainer.supervisor import TrainerSupervisor, TriggerPolicy
from tests.test_feedback_store import make_feedback
from tests.test_shared_state import registry
from tests.test_store import make_record, store_url  # noqa: F401 - the fixture, on both databases


def replica_queue(store: Store) -> RunQueue:
    return RunQueue(store, PolicyRouter("alignd", lambda: [0]), lambda r: trainer_config(TrainerSettings(), r),
                    instance="replica")


async def with_feedback(store: Store) -> None:
    await store.record_base_model({"name": "base", "sha256": None})
    await store.record_completion(make_record(1))
    await store.record_feedback(make_feedback(1))  # a pair and two labels: any objective may be queued


async def test_a_claim_is_one_conditional_update_returning_the_run(store_url: str) -> None:
    async with await Store.open(store_url) as trainer, await Store.open(store_url) as replica:
        await with_feedback(replica)
        queue = replica_queue(replica)
        queued = await queue.start(TrainingRunRequest(iterations=2))
        started = datetime.now(UTC)
        claimed = await trainer.claim_queued_run(queued.id, status="running", holder="trainer", heartbeat=started)
        assert claimed is not None and claimed.id == queued.id
        assert (claimed.status, claimed.holder, claimed.heartbeat) == ("running", "trainer", started)
        assert claimed.config["request"]["iterations"] == 2  # the row as written, the queued request kept
        assert await trainer.claim_queued_run(queued.id, status="running", holder="other") is None  # claimed once
        # A cancel after the claim finds it running: refused, and the run is the trainer's.
        with pytest.raises(Conflict, match="is running, not queued") as refused:
            await queue.cancel(queued.id)
        assert refused.value.code == "run_not_queued"
        assert not await replica.end_queued_run(queued.id, "cancelled", "late", datetime.now(UTC))
        assert (await replica.get_run(queued.id)) == claimed


async def test_a_run_cancelled_as_the_trainer_takes_it_is_logged_as_cancelled(
        store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, "alignd.trainer.supervisor")
    async with await Store.open(store_url) as store, await Store.open(store_url) as replica:
        await with_feedback(replica)
        queue = replica_queue(replica)
        queued = await queue.start(TrainingRunRequest())
        trainer = TrainerSupervisor(store, registry(store, tmp_path), Metrics(), base_model=lambda: "",
                                    database_url=store_url, runs_dir=tmp_path / "runs",
                                    config=lambda r: trainer_config(TrainerSettings(), r), threads=1,
                                    trigger=TriggerPolicy(False, 1, 1, 0), run_timeout_s=None, lease_s=5.0,
                                    hold_lease=True)
        trainer.registry.ready = True  # its promoted version (the base) is served: runs may start

        # The operator's cancel lands just after the trainer read the queue, before its claim.
        read = store.oldest_queued_run

        async def read_then_cancelled():  # type: ignore[no-untyped-def]
            row = await read()
            assert row is not None and row.id == queued.id
            await queue.cancel(row.id)
            return row

        monkeypatch.setattr(store, "oldest_queued_run", read_then_cancelled)
        assert await trainer.take_queued()  # taken off the queue: not retried
        run = await replica.get_run(queued.id)
        assert run is not None and (run.status, run.error) == ("cancelled", "cancelled by an operator")
        assert run.holder is None and run.finished is not None
        assert trainer.current is None and [r.id for r in await replica.list_runs()] == [queued.id]
        messages = [r.getMessage() for r in caplog.records]
        assert f"queued training run {queued.id} was not started: it was cancelled meanwhile (cancelled by an " \
               "operator)" in messages, messages
        assert not any("could not start" in m for m in messages), messages
        monkeypatch.undo()
        assert not await trainer.take_queued()  # nothing left queued
