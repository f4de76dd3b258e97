"""Fencing a trainer that lost its lease (issue 12): the lease's generation is one more at every takeover, a run
records the one it started under, and its trainer's registration, promotion, signal bookkeeping and run-row writes
are refused once the lease is another's. A trainer paused past its lease (its heartbeat did not run) while a standby
took over and failed its run changes nothing when it wakes, and stops its trainer process at its next heartbeat.

On SQLite and PostgreSQL, two stores (two processes) on one database; the trainer processes are real processes on a
real pipe standing in for the training child (what they train is not the point).
"""

# ruff: noqa: F811 - the fixtures are imported from other test modules and used as parameters
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from alignd.metrics import Metrics
from alignd.store import Fence, LeaseLost, RunRow, Store
from alignd.store.tables import adapter_blobs, labels, policies, preference_pairs, promotion, training_runs
from alignd.trainer.supervisor import TrainerSupervisor, TriggerPolicy, _ActiveRun
from tests.test_feedback_store import make_feedback
from tests.test_shared_state import registry, staged_adapter
from tests.test_store import make_record, store_url  # noqa: F401 - the fixture, on both databases

LEASE_S = 1.0


def supervisor(store: Store, data_dir: Path, *, hold_lease: bool = False) -> TrainerSupervisor:
    return TrainerSupervisor(store, registry(store, data_dir), Metrics(), base_model=lambda: "",
                             database_url="", runs_dir=data_dir / "runs", config=lambda _: None,  # type: ignore[arg-type, return-value]
                             threads=1, trigger=TriggerPolicy(False, 1, 1, 0), run_timeout_s=None, lease_s=LEASE_S,
                             hold_lease=hold_lease)


def running_run(run_id: str, fence: Fence) -> RunRow:
    now = datetime.now(UTC)
    return RunRow(id=run_id, status="running", phase="ppo", progress=0.5, trigger="manual", parent=0, candidate=None,
                  promoted=False, config={}, metrics={}, error=None, created=now, finished=None, holder=fence.holder,
                  heartbeat=now, lease_generation=fence.generation)


def report_result(conn: Connection, result: dict[str, Any]) -> None:
    """The trainer process of a run that finished: reports its result and exits."""
    conn.send(("result", result))
    conn.close()


def train_on(conn: Connection) -> None:
    """The trainer process of a run still training (until it is stopped)."""
    time.sleep(600)


def spawn(target: Any, *args: Any) -> tuple[Any, Connection]:
    """A trainer process as the supervisor starts one: spawned, our end of its pipe."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=target, args=(theirs, *args), daemon=True)
    process.start()
    theirs.close()
    return process, ours


async def snapshot(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """What a trainer's writes could change: versions, blobs, the promotion, runs, the signal's bookkeeping."""
    out = {}
    async with store.engine.connect() as conn:
        for table in (policies, adapter_blobs, promotion, training_runs, preference_pairs, labels):
            out[table.name] = sorted((tuple(r) for r in await conn.execute(sa.select(table))), key=repr)
    return out


async def take_over(standby: TrainerSupervisor) -> None:
    """The standby trainer retries the lease (as its loop does every lease_s / 3) until it holds it."""
    deadline = time.monotonic() + 20
    while not standby.holding:
        assert time.monotonic() < deadline, "the standby never took the lease over"
        await standby._renew()
        await asyncio.sleep(LEASE_S / 3)


async def test_a_takeover_is_a_new_generation_and_a_stale_fence_writes_nothing(store_url: str) -> None:
    async with await Store.open(store_url) as a, await Store.open(store_url) as b:
        await a.record_base_model({"name": "base", "sha256": None})
        first = await a.take_lease("first", LEASE_S)
        assert isinstance(first, Fence) and first.holder == "first"
        assert await a.take_lease("first", LEASE_S) == first  # extending its own lease keeps the generation
        assert await b.take_lease("second", LEASE_S) == "first"  # live: not taken
        await a.insert_run(running_run("run-first", first))
        await asyncio.sleep(LEASE_S + 0.2)
        second = await b.take_lease("second", LEASE_S)
        assert second == Fence("second", first.generation + 1)
        assert not await a.heartbeat("first", LEASE_S, "run-first", generation=first.generation)

        before = await snapshot(a)
        with pytest.raises(LeaseLost, match=rf"first no longer holds the trainer lease it held at generation "
                                            rf"{first.generation} \(second holds it at generation"):
            await a.update_run("run-first", first, status="succeeded", error=None)
        with pytest.raises(LeaseLost):
            await a.set_desired(0, datetime.now(UTC), "stale", first)
        with pytest.raises(LeaseLost):
            await a.update_policy(0, status="retired", fence=first)
        with pytest.raises(LeaseLost):
            await a.mark_used("run-first", [1], [1], first)
        assert await snapshot(a) == before
        # The current holder's fence passes.
        await b.update_run("run-first", second, error="checked")
        assert (await a.get_run("run-first")).error == "checked"  # type: ignore[union-attr]

        # Given back (the row is deleted), the next holder still starts above every generation a run recorded.
        await b.insert_run(running_run("run-second", second))
        await b.release_lease("second")
        assert await a.lease_generation() is None
        third = await a.take_lease("first", LEASE_S)
        assert isinstance(third, Fence) and third.generation > second.generation
        with pytest.raises(LeaseLost):  # the same holder as before, but not the run's generation
            await a.update_run("run-first", first, status="succeeded")


async def test_a_trainer_that_lost_its_lease_registers_nothing_when_it_wakes(
        store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "alignd.trainer.supervisor")
    async with await Store.open(store_url) as a, await Store.open(store_url) as b:
        await a.record_base_model({"name": "base", "sha256": None})
        await a.record_completion(make_record(1))
        await a.record_feedback(make_feedback(1))
        pairs = [r["id"] for r in await a.signal_rows("preference_pairs", used=False, limit=10)]
        label_ids = [r["id"] for r in await a.signal_rows("labels", used=False, limit=10)]
        trainer = supervisor(a, tmp_path / "a")
        standby = supervisor(b, tmp_path / "b", hold_lease=True)

        def result(seed: int) -> dict[str, Any]:
            return {"staged_adapter": str(staged_adapter(tmp_path / "staging", seed)), "figures": {"seed": seed},
                    "passed": True, "reason": "test", "new_pair_ids": pairs, "new_label_ids": label_ids}

        async def settle(run_id: str, seed: int, promote: bool) -> None:
            """The trainer's run ends with a result, as it does when its supervisor reads the pipe."""
            row = await a.get_run(run_id)
            assert row is not None
            process, conn = spawn(report_result, result(seed))
            trainer.current = _ActiveRun(row=row, process=process, conn=conn, promote=promote, parent_adapter=None)
            await trainer._supervise(trainer.current)
            assert trainer.current is None

        # While it holds the lease, its fence lets its writes through: a first run registers its candidate.
        fence = await a.take_lease(trainer.owner, LEASE_S)
        assert isinstance(fence, Fence)
        await a.insert_run(running_run("run-held", fence))
        await settle("run-held", 1, promote=False)
        held = await a.get_run("run-held")
        assert held is not None and held.status == "succeeded" and held.candidate == 1, held

        # A second run starts (the lease was given back after the first: taken again, a new generation); then the
        # trainer is paused (no heartbeat) past its lease, and the standby takes over, failing the run as an orphan.
        fence = await a.take_lease(trainer.owner, LEASE_S)
        assert isinstance(fence, Fence) and fence.generation > held.lease_generation  # type: ignore[operator]
        await a.insert_run(running_run("run-paused", fence))
        await take_over(standby)
        assert await b.lease_generation() == fence.generation + 1
        failed = await b.get_run("run-paused")
        assert failed is not None and failed.status == "failed"
        assert f"marked failed by {standby.owner}" in (failed.error or "")
        before = await snapshot(a)

        # It wakes with its run's result: registration is refused, and nothing changes (no version, no blob, no
        # promotion, the signal not marked used, the run as the standby marked it).
        caplog.clear()
        await settle("run-paused", 2, promote=True)
        assert await snapshot(a) == before
        assert [p.version for p in await a.list_policies()] == [1, 0]
        assert not (tmp_path / "a" / "policies" / "2").exists()
        messages = [r.getMessage() for r in caplog.records]
        assert any("run-paused: its candidate was not registered" in m and "no longer holds the trainer lease" in m
                   for m in messages), messages
        assert any("run-paused: its outcome" in m and "stays as the lease's new holder marked it" in m
                   for m in messages), messages
        assert not any("training run run-paused failed" in m or "succeeded" in m for m in messages), messages


async def test_a_trainer_whose_lease_was_taken_stops_its_run_at_its_next_heartbeat(
        store_url: str, tmp_path: Path) -> None:
    async with await Store.open(store_url) as a, await Store.open(store_url) as b:
        trainer = supervisor(a, tmp_path / "a")
        standby = supervisor(b, tmp_path / "b", hold_lease=True)
        fence = await a.take_lease(trainer.owner, LEASE_S)
        assert isinstance(fence, Fence)
        row = running_run("run-training", fence)
        await a.insert_run(row)
        process, conn = spawn(train_on)
        active = _ActiveRun(row=row, process=process, conn=conn, promote=True, parent_adapter=None)
        trainer.current = active
        supervising = asyncio.create_task(trainer._supervise(active))
        try:
            # Paused: its heartbeat does not run, while the standby takes the lease over and fails the run.
            await take_over(standby)
            marked = await b.get_run("run-training")
            assert marked is not None and marked.status == "failed"
            assert process.is_alive()
            # It wakes: its next heartbeat finds the lease taken and stops the trainer process (SIGTERM, well
            # before the grace after which it would be killed).
            woke = time.monotonic()
            heartbeat = asyncio.create_task(trainer._heartbeat())
            while process.is_alive():
                assert time.monotonic() - woke < 5, "the trainer process still runs"
                await asyncio.sleep(0.05)
            assert process.exitcode == -signal.SIGTERM
            await asyncio.wait_for(supervising, 30)
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        finally:
            if process.is_alive():
                process.kill()
        assert await a.get_run("run-training") == marked  # the standby's word stands
        assert trainer.current is None and active.cancelled == "failed"
