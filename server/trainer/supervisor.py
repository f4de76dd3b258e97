"""The server's side of training: starts each run in its own process, supervises it, registers and promotes.

Each run is a fresh process (``spawn``: no CUDA or vLLM state inherited), so a crash, a kill or a leak in training
never reaches serving. The process reports progress and asks for rollouts over one pipe (the messages are listed in
:mod:`alignd.trainer.child`, the process's side). The supervisor answers rollout calls with the serving engine,
registers the candidate, promotes it when it passed the gate, and marks the run failed whenever the process ends
without a result (crash, kill, time limit).

One trainer across replicas: a run starts only in the process holding the database's trainer lease (table
``trainer_lease``), which it renews with a heartbeat every ``lease_s / 3`` while the run lasts (stamping the run's
``heartbeat`` too) and gives up when the run is settled. A process whose renewal finds the lease taken, or that could
not renew it for a whole lease (the database unreachable), stops its run's trainer process. A run whose holder holds
no live lease (its server died, or lost the database for longer than the lease) is marked failed by the next process
to take the lease: every supervisor looks for such runs while it is idle.

Fencing: each takeover of the lease is a new generation, and a run records the one it started under. Its candidate's
registration and promotion (or canary), its signal marked used and every write of its row are refused in their own
transaction once the lease has another holder or generation (:class:`alignd.store.LeaseLost`): a trainer paused for
longer than the lease (a GC pause, SIGSTOP, a network partition) while another process took over and failed its run
changes nothing when it wakes, and stops its trainer process.

In the ``alignd trainer`` process (``hold_lease``) the supervisor holds the lease for as long as it runs, idle or
not, so that a second trainer process stays standby: it retries every ``lease_s / 3``, so it takes over at most a
lease plus one retry interval (``4/3 * lease_s``) after the first one's last renewal; as the holder it takes the runs
serving replicas queued (first in, first out) and starts automatic ones. This module imports no torch: the server
imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec

from alignd.engine.rollouts import adapter_replies
from alignd.errors import AlignError, Conflict, NotFound, Unavailable
from alignd.faults import failpoint
from alignd.metrics import Metrics
from alignd.policies.canary import CanaryExperiment
from alignd.policies.registry import PolicyRegistry
from alignd.policies.router import RESERVED_VERSIONS
from alignd.protocol import TrainingRun, TrainingRunList, TrainingRunRequest
from alignd.store import Fence, LeaseLost, RunRow, Store
from alignd.trainer.child import child_main
from alignd.trainer.config import TrainerConfig
from alignd.trainer.job import RunJob

log = logging.getLogger(__name__)

__all__ = ["TrainerSupervisor", "TriggerPolicy", "default_threads"]


@dataclass
class TriggerPolicy:
    """When the server starts a run by itself."""

    auto: bool
    min_new_pairs: int
    min_new_labels: int
    min_interval_s: float
    poll_s: float = 5.0


@dataclass
class _ActiveRun:
    row: RunRow
    process: Any
    conn: Connection
    promote: bool
    parent_adapter: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: str | None = None
    kill_at: float | None = None
    """When a process asked to stop (SIGTERM) is killed if it has not exited."""
    task: asyncio.Task[None] | None = None
    renewed: float = field(default_factory=time.monotonic)
    """When the lease was last renewed for this run (monotonic): a lease not renewed for ``lease_s`` may be
    another's."""

    @property
    def fence(self) -> Fence | None:
        """What this run's writes are fenced by: the lease's holder and generation it started under."""
        return self.row.fence


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def wire_run(row: RunRow) -> TrainingRun:
    return TrainingRun(id=row.id, status=row.status, phase=row.phase, progress=row.progress,  # type: ignore[arg-type]
                       trigger=row.trigger, parent=row.parent, candidate=row.candidate,  # type: ignore[arg-type]
                       promoted=row.promoted, created=row.created.isoformat(), finished=_iso(row.finished),
                       config=row.config, metrics=row.metrics, error=row.error)


class TrainerSupervisor:
    """Starts runs (one at a time), relays the trainer's requests and reports, and settles each run's outcome."""

    def __init__(self, store: Store, registry: PolicyRegistry, metrics: Metrics, *, base_model: Callable[[], str],
                 database_url: str, runs_dir: Path, config: Callable[[TrainingRunRequest], TrainerConfig], threads: int,
                 trigger: TriggerPolicy, run_timeout_s: float | None, lease_s: float = 30.0,
                 hold_lease: bool = False) -> None:
        self.store = store
        self.registry = registry
        self.canary: CanaryExperiment | None = None
        """Where a candidate that passed the gate goes for its live test (None: promoted at once)."""
        self.metrics = metrics
        self.base_model = base_model
        self.database_url = database_url
        self.runs_dir = runs_dir
        self.config = config
        self.threads = threads
        self.trigger = trigger
        self.run_timeout_s = run_timeout_s
        self.current: _ActiveRun | None = None
        # Unique per process, not per data dir: two processes on one data dir (or a restart) are different holders.
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        """Seconds the trainer lease lasts unless renewed; a dead trainer's run is failed at most this much later
        (plus a heartbeat period)."""
        self._watch: asyncio.Task[None] | None = None
        self._versions = itertools.count()
        self._start_lock = asyncio.Lock()
        self._auto: asyncio.Task[None] | None = None
        self.stopping = False
        """True once the server is shutting down: no run starts."""
        self._skipped: str | None = None
        """Why the automatic trigger last skipped a due run (logged once, not at every poll)."""
        self.hold_lease = hold_lease
        """Hold the trainer lease while idle too, and take queued runs (the ``alignd trainer`` process)."""
        self.holding: bool | None = None
        """Whether this process held the lease at its last renewal (``hold_lease`` only; False: standby; None: not
        known yet)."""

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Fail the runs a previous server left running (their process died with it); start the heartbeat and the
        auto trigger."""
        if self.hold_lease:  # the lease comes first: runs, orphans and the queue are the holder's business
            self._watch = asyncio.create_task(self._hold(), name="alignd-trainer-lease")
            self._auto = asyncio.create_task(self._auto_trigger(), name="alignd-training-trigger")
            return
        if self.store.embedded:  # one process owns a SQLite file: every run still running is an orphan
            for run_id in await self.store.fail_running_runs("the server stopped during the run", datetime.now(UTC)):
                log.warning("training run %s was orphaned by a server restart: marked failed", run_id)
                self.metrics.training_runs.labels("failed").inc()
        else:
            await self.sweep()
        self._watch = asyncio.create_task(self._heartbeat(), name="alignd-trainer-heartbeat")
        if self.trigger.auto:
            self._auto = asyncio.create_task(self._auto_trigger(), name="alignd-training-trigger")

    def begin_shutdown(self) -> None:
        """The server is stopping (SIGTERM): start no run, and stop the running one now rather than after the
        drain (it is marked failed once its process has exited)."""
        self.stopping = True
        if self._auto is not None:
            self._auto.cancel()
        if self._watch is not None and self.current is None:  # a running run keeps its lease until it settles
            self._watch.cancel()
        if self.current is not None:
            self._stop(self.current, "the server stopped during the run")

    async def close(self) -> None:
        """Stop the auto trigger and any running run (marked failed: the server is stopping)."""
        self.begin_shutdown()
        if self._auto is not None:
            await asyncio.gather(self._auto, return_exceptions=True)
        active = self.current
        if active is not None and active.task is not None:
            # Bounded: the process gets STOP_GRACE_S, the outcome write a few tries (a run whose write never
            # lands is failed as an orphan by the next start).
            done, _ = await asyncio.wait({active.task}, timeout=STOP_GRACE_S + SETTLE_AT_SHUTDOWN_S + 15)
            if not done:
                log.error("training run %s did not settle at shutdown; the next start marks it failed",
                          active.row.id)
                active.task.cancel()
                await asyncio.gather(active.task, return_exceptions=True)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.hold_lease and self.holding:  # a standby trainer takes over now rather than after the lease
            try:
                await self.store.release_lease(self.owner)
            except Exception:
                log.exception("could not give the trainer lease back; it expires in %.0f s", self.lease_s)

    # --- the trainer lease ------------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Every ``lease_s / 3``: renew the lease while a run lasts (stopping the run if another process took the
        lease), else look for runs whose trainer stopped heartbeating."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                active = self.current
                if active is not None:
                    await self._beat(active)
                elif not self.stopping:
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be briefly away: the next beat tries again
                log.exception("the trainer heartbeat failed; retrying")
                self._check_lapsed()

    async def _beat(self, active: _ActiveRun) -> bool:
        """Renew the lease for ``active`` (at its generation) and stamp its heartbeat; when another process took the
        lease, stop its trainer process now (its writes would be refused anyway) and return False."""
        fence = active.fence
        if await self.store.heartbeat(self.owner, self.lease_s, active.row.id,
                                      generation=fence.generation if fence is not None else None):
            active.renewed = time.monotonic()
            return True
        self.holding = False
        log.error("training run %s lost the trainer lease (not renewed in time; another process took it): stopping "
                  "it", active.row.id)
        self._stop(active, "this trainer lost the trainer lease (its heartbeat lapsed and another process took it)")
        return False

    def _check_lapsed(self) -> None:
        """After a failed renewal: once the lease went a whole ``lease_s`` without one, another process may hold it
        (and fail the run): stop the run's trainer process rather than train on without the lease."""
        active = self.current
        if active is not None and time.monotonic() - active.renewed >= self.lease_s:
            log.error("training run %s: the trainer lease could not be renewed for %.0f s (it has expired and may be "
                      "another's): stopping it", active.row.id, time.monotonic() - active.renewed)
            self._stop(active, f"this trainer could not renew the trainer lease for {self.lease_s:.0f} s (the "
                               "database was unreachable): another process may have taken it")

    async def _hold(self) -> None:
        """``hold_lease``: take or renew the lease every ``lease_s / 3`` (stamping the running run's heartbeat);
        standby, retrying, while another process holds it. Taking it over fails the runs its last holder left."""
        while True:
            try:
                await self._renew()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be briefly away: the next beat tries again
                log.exception("renewing the trainer lease failed; retrying")
                self._check_lapsed()
            await asyncio.sleep(self.lease_s / 3)

    async def _renew(self) -> None:
        active = self.current
        if active is not None:
            await self._beat(active)
            return
        if self.stopping:
            return
        holder = await self.store.acquire_lease(self.owner, self.lease_s)
        if holder is None and self.holding is not True:
            self.holding = True
            log.info("took the trainer lease (%s): this trainer is active", self.owner)
            async with self._start_lock:
                await self._fail_orphans()
        elif holder is not None and self.holding is not False:
            self.holding = False
            log.info("standby: %s holds the trainer lease; retrying every %.0f s", holder, self.lease_s / 3)

    async def sweep(self) -> list[str]:
        """Mark failed the runs whose trainer stopped heartbeating (their holder holds no live lease), taking the
        lease to do so (and giving it back); returns their ids. Nothing happens while another process holds it."""
        async with self._start_lock:
            if self.current is not None or not await self.store.orphaned_runs():
                return []
            if await self.store.acquire_lease(self.owner, self.lease_s) is not None:
                return []
            try:
                return await self._fail_orphans()
            finally:
                if self.current is None:
                    await self.store.release_lease(self.owner)

    async def _fail_orphans(self) -> list[str]:
        """As the lease's holder: every other running run's trainer is gone."""
        failed = await self.store.fail_orphaned_runs(
            self.owner, lambda dead: f"its trainer {dead or '(unknown)'} stopped heartbeating (its server stopped or "
                                     f"lost the database); marked failed by {self.owner}, which took the trainer lease")
        for run_id in failed:
            log.warning("training run %s: its trainer stopped heartbeating; marked failed", run_id)
            self.metrics.training_runs.labels("failed").inc()
        return failed

    # --- runs -------------------------------------------------------------------------------------------------

    async def list(self, limit: int = 50) -> TrainingRunList:
        return TrainingRunList(data=[wire_run(r) for r in await self.store.list_runs(limit)])

    async def get(self, run_id: str) -> TrainingRun:
        row = await self.store.get_run(run_id)
        if row is None:
            raise NotFound(f"There is no training run '{run_id}'.", param="id", code="run_not_found")
        return wire_run(row)

    async def start(self, request: TrainingRunRequest, trigger: str = "manual",
                    queued: RunRow | None = None) -> TrainingRun:
        """Start a run now (``queued``: the run a serving replica queued, which keeps its id); 409 while another runs
        or when there is nothing to train on."""
        async with self._start_lock:
            if self.current is not None:
                raise Conflict(f"Training run {self.current.row.id} is in progress; one run at a time.",
                               code="run_in_progress")
            if self.stopping:
                raise Unavailable("The server is shutting down.", code="shutting_down")
            if not self.registry.ready:
                raise Unavailable("The model is still loading; retry shortly.", headers={"Retry-After": "5"})
            if self.registry.unavailable is not None:
                raise Conflict(f"Not training from a policy that is not served: {self.registry.unavailable}.",
                               code="policy_unavailable")
            config = self.config(request)
            if (refusal := await signal_refusal(self.store, config.objective)) is not None:
                raise refusal
            fence = await self.store.take_lease(self.owner, self.lease_s)
            if not isinstance(fence, Fence):
                raise Conflict(f"Another server ({fence}) holds the trainer lease: one training run at a time across "
                               "replicas.", code="run_in_progress")
            self.holding = True
            try:
                await self._fail_orphans()  # the lease was free or expired: a run still "running" has no trainer
                parent = self.registry.router.promoted
                parent_row = await self.store.get_policy(parent)
                adapter = await self.registry.materialize(parent_row) if parent_row is not None else None
                parent_adapter = str(adapter) if adapter is not None else None
                now = datetime.now(UTC)
                row = RunRow(id=queued.id if queued else f"run-{uuid.uuid4().hex[:12]}", status="running",
                             phase="starting", progress=0.0, trigger=trigger, parent=parent, candidate=None,
                             promoted=False, config={**dataclasses.asdict(config), "owner": self.owner}, metrics={},
                             error=None, created=queued.created if queued else now, finished=None, holder=self.owner,
                             heartbeat=now, lease_generation=fence.generation)
                if queued is None:
                    await self.store.insert_run(row)
                else:
                    row.config["request"] = queued.config.get("request") or {}
                    started = {k: v for k, v in msgspec.structs.asdict(row).items() if k not in ("id", "created")}
                    if (claimed := await self.store.claim_queued_run(row.id, **started)) is None:
                        now_row = await self.store.get_run(row.id)
                        status = now_row.status if now_row is not None else "gone"
                        raise Conflict(f"Training run {row.id} is no longer queued (it is {status}).",
                                       code="run_not_queued")
                    row = claimed
            except BaseException:
                await asyncio.shield(self._give_lease_back())
                raise
            reward_model, kl_coef = await self._carried_over()
            job = RunJob(run_id=row.id, base_model=self.base_model(), database_url=self.database_url,
                         run_dir=str(self.runs_dir / row.id), parent=parent, parent_adapter=parent_adapter,
                         config=config, previous_reward_model=reward_model, kl_coef=kl_coef, threads=self.threads)
            try:
                # On the event loop's thread, which lives as long as the server: the process's parent-death signal
                # (Linux) fires when the thread that started it ends. Starting it takes milliseconds (a small job).
                active = self._spawn(row, job, request.promote)
            except BaseException as e:
                await asyncio.shield(self.store.update_run(row.id, row.fence, status="failed",
                                                           finished=datetime.now(UTC),
                                                           error=f"the trainer process did not start: {e!r}"))
                await asyncio.shield(self._give_lease_back())
                raise
            self.current = active
            active.task = asyncio.create_task(self._supervise(active), name=f"alignd-{row.id}")
            self.metrics.training_running.set(1)
            log.info("training run %s started (%s) from policy %d", row.id, trigger, parent)
            return wire_run(row)

    def _spawn(self, row: RunRow, job: RunJob, promote: bool) -> _ActiveRun:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        process = ctx.Process(target=child_main, args=(child_conn, job, os.getpid()), name=f"alignd-trainer-{row.id}",
                              daemon=True)
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            child_conn.close()
            raise
        child_conn.close()  # the child holds its end; ours must close for EOF to reach us when it exits
        return _ActiveRun(row=row, process=process, conn=parent_conn, promote=promote,
                          parent_adapter=job.parent_adapter)

    async def _carried_over(self) -> tuple[str | None, float | None]:
        """What a new run continues from: the newest reward model an earlier run saved, and β where the newest
        succeeded run's KL controller ended."""
        reward_model, kl_coef = None, None
        for run in await self.store.list_runs(limit=50):
            folder = self.runs_dir / run.id / "reward"
            if reward_model is None and (folder / "reward.json").is_file():
                reward_model = str(folder)
            coef = (run.metrics.get("kl_controller") or {}).get("kl_coef")
            if kl_coef is None and run.status == "succeeded" and isinstance(coef, int | float):
                kl_coef = float(coef)
        return reward_model, kl_coef

    async def cancel(self, run_id: str) -> TrainingRun:
        active = self.current
        if active is None or active.row.id != run_id:
            if await self.store.end_queued_run(run_id, "cancelled", "cancelled by an operator", datetime.now(UTC)):
                return await self.get(run_id)
            await self.get(run_id)  # 404 for an unknown id
            raise Conflict(f"Training run {run_id} is not running.", code="run_not_running")
        self._stop(active, "cancelled by an operator", cancelled=True)
        if active.task is not None:
            await asyncio.gather(asyncio.shield(active.task), return_exceptions=True)
        return await self.get(run_id)

    def _stop(self, active: _ActiveRun, reason: str, cancelled: bool = False) -> None:
        if active.cancelled is not None:
            return  # already stopping: keep the first reason
        active.cancelled = "cancelled" if cancelled else "failed"
        active.error = reason
        if active.process.is_alive():
            active.process.terminate()
            active.kill_at = time.monotonic() + STOP_GRACE_S
            active.wake.set()  # the supervisor recomputes its wait to honour kill_at

    # --- supervision ------------------------------------------------------------------------------------------

    async def _supervise(self, active: _ActiveRun) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        threading.Thread(target=_pump, args=(active.conn, loop, inbox), daemon=True,
                         name=f"alignd-pipe-{active.row.id}").start()
        deadline = None if self.run_timeout_s is None else time.monotonic() + self.run_timeout_s
        calls: set[asyncio.Task[None]] = set()
        try:
            while True:
                now = time.monotonic()
                if active.kill_at is not None and now >= active.kill_at:
                    active.process.kill()  # it ignored SIGTERM for STOP_GRACE_S
                    active.kill_at = None
                if deadline is not None and now >= deadline:
                    self._stop(active, f"the run exceeded its time limit of {self.run_timeout_s:.0f} s")
                    deadline = None
                wakeups = [t for t in (deadline, active.kill_at) if t is not None]
                message = await _next_message(inbox, active.wake, min(wakeups) - now if wakeups else None)
                if message is _WOKEN:
                    continue
                if message is None:
                    break
                await self._handle(active, message, calls)
        finally:
            for task in calls:
                task.cancel()
            await asyncio.to_thread(_reap, active.process)
            active.conn.close()
            try:
                await self._settle(active)
            finally:
                self.current = None
                self.metrics.training_running.set(0)
                try:  # a lease not given back expires (and an unsettled run is then failed by the next holder)
                    await self._give_lease_back()
                except Exception:
                    log.exception("could not give the trainer lease back; it expires in %.0f s", self.lease_s)

    async def _give_lease_back(self) -> None:
        """After a run (or a start that failed): give the lease back, unless this process holds it for good."""
        if not self.hold_lease:
            await self.store.release_lease(self.owner)

    async def _handle(self, active: _ActiveRun, message: tuple[Any, ...], calls: set[asyncio.Task[None]]) -> None:
        kind = message[0]
        if kind == "progress":
            _, phase, progress, metrics = message
            active.metrics.update(metrics)
            active.row.phase, active.row.progress = phase, progress
            self.metrics.training_progress.set(progress)
            for name, value in _headline(active.metrics).items():
                self.metrics.training_figure.labels(name).set(value)
            try:
                await self.store.update_run(active.row.id, active.fence, phase=phase, progress=progress,
                                            metrics=active.metrics)
            except LeaseLost as e:  # another process took the lease over (and failed this run): stop training
                log.error("training run %s: its progress write was refused (%s): stopping it", active.row.id, e)
                self._stop(active, f"this trainer lost the trainer lease: {e}")
            except Exception:  # a missed progress write must not stop the run; the outcome is written at the end
                log.exception("could not record the progress of run %s", active.row.id)
        elif kind == "call":
            task = asyncio.create_task(self._answer(active, *message[1:]))
            calls.add(task)
            task.add_done_callback(calls.discard)
        elif kind == "result":
            active.result = message[1]
        elif kind == "error":
            active.error = message[1]
            log.error("training run %s failed:\n%s", active.row.id, message[2])

    async def _answer(self, active: _ActiveRun, n: int, method: str, payload: dict[str, Any]) -> None:
        try:
            if method != "rollouts":
                raise ValueError(f"unknown call {method!r}")
            reply: tuple[Any, ...] = ("reply", n, True, await self._rollouts(active.row.id, payload))
        except Exception as e:  # the trainer raises it as the run's error
            reply = ("reply", n, False, f"{type(e).__name__}: {e}")
        try:
            active.conn.send(reply)
        except OSError:
            pass  # the process is gone; the supervisor settles the run

    async def _rollouts(self, run_id: str, payload: dict[str, Any]) -> list[tuple[list[int], bool]]:
        replies = await adapter_replies(  # a fresh reserved version per request
            self.registry.engine, payload["prompts"], payload["adapter_dir"],
            RESERVED_VERSIONS + next(self._versions) % 1_000_000, temperature=payload["temperature"],
            max_new_tokens=payload["max_new_tokens"], request_prefix=f"rollout-{run_id}", seeds=payload.get("seeds"))
        self.metrics.rollout_requests.inc(len(replies))
        return replies

    async def _settle(self, active: _ActiveRun) -> None:
        """Record the outcome: register (and maybe promote) the candidate, or mark the run failed / cancelled."""
        row, status, error = active.row, "failed", active.error
        candidate, promoted = None, False
        if active.cancelled is None and active.result is not None:
            outcome: dict[str, Any] = {}
            try:
                promoted, error = await self._register(active, outcome)
                status = "succeeded" if error is None else "failed"
            except LeaseLost as e:
                log.error("training run %s: its candidate was not %s: %s", row.id,
                          "promoted" if "version" in outcome else "registered", e)
                error = f"this trainer lost the trainer lease before its candidate was settled: {e}"
            except Exception as e:
                log.exception("registering the candidate of run %s failed", row.id)
                error = f"registering the candidate failed: {type(e).__name__}: {e}"
            candidate = outcome.get("version")
        elif active.cancelled is not None:
            status = active.cancelled
        elif error is None:
            error = f"the trainer process ended without a result ({_exit_reason(active.process.exitcode)})"
        # The outcome must be recorded, or the run would show "running" for good: retry through a database outage
        # for as long as the server runs (no other run starts meanwhile), a few times once it is stopping.
        attempt, stopping_since = 0, None
        while True:
            try:
                await self.store.update_run(row.id, active.fence, status=status,
                                            phase="done" if status == "succeeded" else row.phase,
                                            progress=1.0 if status == "succeeded" else row.progress,
                                            candidate=candidate, promoted=promoted, error=error,
                                            metrics=active.metrics, finished=datetime.now(UTC))
                break
            except LeaseLost as e:  # the process that took the lease over marked the run failed: its word stands
                log.error("training run %s: its outcome (%s%s) was not recorded: %s; the run stays as the lease's new "
                          "holder marked it", row.id, status, f": {error}" if error else "", e)
                return
            except Exception:
                attempt += 1
                log.exception("could not record the outcome of run %s (attempt %d)", row.id, attempt)
                if self.stopping:
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > SETTLE_AT_SHUTDOWN_S:
                        log.error("giving up on recording the outcome of run %s: the next start marks it failed",
                                  row.id)
                        break
                await asyncio.sleep(min(2.0 ** (attempt - 1), 30.0))
        self.metrics.training_runs.labels(status).inc()
        log.info("training run %s %s%s", row.id, status, f": {error}" if error else "")

    async def _register(self, active: _ActiveRun, outcome: dict[str, Any]) -> tuple[bool, str | None]:
        """Register the candidate (its version goes into ``outcome`` at once) and promote it when it should be."""
        result, row, fence = active.result or {}, active.row, active.fence
        policy = await self.registry.register(Path(result["staged_adapter"]), parent=row.parent, run_id=row.id,
                                              metrics=result["figures"], passed=result["passed"],
                                              reason=result["reason"], fence=fence)
        outcome["version"] = policy.version
        await self.store.mark_used(row.id, result["new_pair_ids"], result["new_label_ids"], fence)
        failpoint("promote:registered")  # tests: a crash between registration and promotion
        if not (result["passed"] and active.promote):
            return False, None
        if self.registry.router.promoted != row.parent:  # an operator promoted another version meanwhile
            return False, None
        try:
            if self.canary is not None and self.canary.config.share > 0:  # a live test decides, not the run
                await self.canary.start(policy.version, reason=f"passed the gate in {row.id}: on canary", fence=fence)
                return False, None
            await self.registry.promote(policy.version, reason=f"passed the gate in {row.id}", fence=fence)
        except AlignError as e:
            return False, f"promotion failed: {e.message}"
        return True, None

    # --- automatic runs ---------------------------------------------------------------------------------------

    async def _auto_trigger(self) -> None:
        while True:
            await asyncio.sleep(self.trigger.poll_s)
            try:
                if self.hold_lease and (not self.holding or self.current is not None or not self.registry.ready):
                    continue  # standby, busy, or the engine still loading
                if self.hold_lease and await self.take_queued():
                    continue
                if not self.trigger.auto:
                    continue
                # While a canary is under its live test, the next candidate waits for the verdict: starting it
                # would end that test before users could decide it (and train from a parent about to change).
                if (self.current is None and self.registry.ready and self.registry.router.canary is None
                        and await self._due()):
                    objective = self.config(TrainingRunRequest()).objective
                    if (refusal := await signal_refusal(self.store, objective)) is not None:
                        if refusal.message != self._skipped:  # once per reason, not at every poll
                            log.warning("automatic training run skipped: %s", refusal.message)
                        self._skipped = refusal.message
                        continue
                    self._skipped = None
                    await self.start(TrainingRunRequest(), trigger="auto")
            except asyncio.CancelledError:
                raise
            except (Conflict, Unavailable):
                pass
            except Exception:
                log.exception("the automatic training trigger failed; retrying later")

    async def take_queued(self) -> bool:
        """Start the run queued longest ago, if any; True when one was taken (started, or failed because it cannot
        start: a queued run that would be refused now is not retried for ever)."""
        from alignd.trainer.queue import queued_request  # it imports this module

        row = await self.store.oldest_queued_run()
        if row is None:
            return False
        try:
            await self.start(queued_request(row), trigger=row.trigger, queued=row)
        except Unavailable:
            return False  # the model is loading or the server stopping: it stays queued
        except AlignError as e:
            if e.code == "run_in_progress":
                return False
            # An operator may cancel it at any moment until it is claimed (a conditional UPDATE from queued): say
            # what happened to it, not what this process meant to do.
            if e.code != "run_not_queued" and await self.store.end_queued_run(
                    row.id, "failed", f"it could not start: {e.message}", datetime.now(UTC)):
                log.warning("queued training run %s could not start: %s", row.id, e.message)
            else:
                now = await self.store.get_run(row.id)
                log.info("queued training run %s was not started: it was %s meanwhile (%s)", row.id,
                         now.status if now is not None else "deleted", (now.error if now is not None else None)
                         or "no reason recorded")
        return True

    async def _due(self) -> bool:
        pairs, labels = await self.store.count_unused_signal()
        if pairs < self.trigger.min_new_pairs and labels < self.trigger.min_new_labels:
            return False
        last = await self.store.list_runs(limit=1)
        if not last:
            return True
        if last[0].status == "failed" and REWARD_MODEL_NOT_READY in (last[0].error or ""):
            # Training again on the same feedback would re-test the same held-out set until chance passes it:
            # wait for as much new signal as the trigger asks for, beyond what that run saw.
            seen = last[0].metrics.get("data") or {}
            if (pairs < seen.get("new_pairs", 0) + self.trigger.min_new_pairs
                    and labels < seen.get("new_labels", 0) + self.trigger.min_new_labels):
                return False
        # After a failed run wait at least a minute, so that a persistent failure does not spin.
        interval = max(self.trigger.min_interval_s, 60.0) if last[0].status == "failed" else self.trigger.min_interval_s
        return (datetime.now(UTC) - last[0].created).total_seconds() >= interval


async def signal_refusal(store: Store, objective: str) -> Conflict | None:
    """Why a run of ``objective`` cannot start on the feedback stored, or None; counted cheaply over all the stored
    signal (trained on before or not, held out or not): nothing at all to train on, ``online-dpo`` without one
    preference pair (it could rank its own samples alone, but a run that learns nothing from its users is refused),
    ``kto`` without one good/bad label (thumbs, clear ratings)."""
    _, pairs, labels = await store.count_feedback()
    if pairs + labels == 0:
        return Conflict("Nothing to train on yet: no feedback has produced preference pairs or labels.",
                        code="no_training_data")
    if objective == "online-dpo" and pairs == 0:
        return Conflict(f"The online-dpo objective trains on users' preference pairs, and no feedback has produced "
                        f"one yet ({labels} good/bad labels: the kto objective trains on those).", param="objective",
                        code="objective_needs_pairs")
    if objective == "kto" and labels == 0:
        return Conflict(f"The kto objective trains on good/bad labels (thumbs, clear ratings), and no feedback has "
                        f"produced one yet ({pairs} preference pairs: ppo, grpo, rloo and online-dpo train on "
                        "those).", param="objective", code="objective_needs_labels")
    return None


REWARD_MODEL_NOT_READY = "RewardModelNotBetterThanChance"
"""The name the trainer process's error starts with when a run stopped at the reward-model check (the supervisor
imports no torch, so not the class)."""

_WOKEN = object()
STOP_GRACE_S = 15.0
"""Seconds a trainer process gets to exit after SIGTERM before it is killed."""
SETTLE_AT_SHUTDOWN_S = 10.0
"""Seconds a stopping server keeps retrying a run's outcome write before leaving it to the next start."""


async def _next_message(inbox: asyncio.Queue[Any], wake: asyncio.Event, wait_s: float | None) -> Any:
    """The next message from the pipe, or ``_WOKEN`` when ``wake`` is set or ``wait_s`` passes first."""
    if not inbox.empty():
        return inbox.get_nowait()
    getter = asyncio.ensure_future(inbox.get())
    waiter = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({getter, waiter}, timeout=max(0.0, wait_s) if wait_s is not None else None,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        wake.clear()
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return _WOKEN


def _pump(conn: Connection, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Any]) -> None:
    """Thread: move messages from the pipe onto the event loop; None when the process's end closes."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = None
        except Exception as e:  # an unpicklable message: report it as the run's error
            message = ("error", f"unreadable message from the trainer: {e}", "")
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, message)
        except RuntimeError:
            return  # the loop is closed
        if message is None:
            return


def _reap(process: Any) -> None:
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(5)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures /metrics shows for the current run."""
    out: dict[str, float] = {}
    if metrics.get("ppo"):
        last = metrics["ppo"][-1]
        for name in ("reward", "kl", "entropy", "approx_kl", "clip_fraction", "explained_variance", "tokens_per_s"):
            if isinstance(last.get(name), int | float):
                out[f"ppo_{name}"] = float(last[name])
    reward_model = metrics.get("reward_model") or {}
    if isinstance(accuracy := reward_model.get("heldout_accuracy"), int | float):
        out["reward_model_heldout_accuracy"] = float(accuracy)
    if interval := reward_model.get("heldout_interval"):
        out["reward_model_heldout_low"], out["reward_model_heldout_high"] = float(interval[0]), float(interval[1])
    for kind, figures in (reward_model.get("heldout_by_kind") or {}).items():
        if isinstance(figures.get("accuracy"), int | float):
            out[f"reward_model_heldout_accuracy_{kind}"] = float(figures["accuracy"])
    return out


def default_threads() -> int:
    """Half the CPUs (the engine needs the rest), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)
