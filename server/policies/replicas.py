"""Replicas on one database agreeing on what the served name means: heartbeats, the flip condition, and the loop
that reacts to promotions (LISTEN/NOTIFY on PostgreSQL, polling as the fallback and on SQLite).

Two phases: a promotion records the *desired* version; each replica loads it and reports it in its heartbeat; the
*served* version (what ``alignd`` routes to) becomes the desired one once every live, ready replica has it loaded,
or after ``timeout_s`` without the laggards, which are then not ready until they load it. Until the flip every
replica keeps serving the old served version, loaded or not the new one, so no completion names a version that
was not loaded on every live replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from alignd.config import StoreSettings
from alignd.store import Store
from alignd.store.replicas import CHANNEL, PromotionRow, ReplicaRow

__all__ = ["Liveness", "ReplicaSet", "flip_laggards", "lagging"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Liveness:
    """When a heartbeat row counts."""

    heartbeat_s: float = 5.0
    """Seconds between two heartbeats of a process."""
    missed: int = 3
    """A replica is live while its last heartbeat is at most this many periods old."""
    prune_after_s: float = 3600.0
    """Rows of replicas dead this long are deleted."""

    def live(self, row: ReplicaRow, now: datetime) -> bool:
        return now - row.last_seen <= timedelta(seconds=self.heartbeat_s * self.missed)


def lagging(version: int, live: list[ReplicaRow]) -> list[ReplicaRow]:
    """The live replicas that serve (ready, not the trainer) and have not loaded ``version``: those a flip to it
    waits for. Replicas not ready (starting, or laggards of an earlier flip) serve nobody and are not waited for."""
    return [r for r in live if r.ready and r.role != "trainer" and version not in r.loaded]


def flip_laggards(state: PromotionRow, live: list[ReplicaRow], now: datetime,
                  timeout_s: float) -> dict[str, str] | None:
    """Whether to flip the served version to the desired one now: None (not yet: nothing pending, or live replicas
    still loading within the timeout), else the laggards to go ahead without (``{instance id: why}``, empty when
    every live replica has it)."""
    if state.desired == state.served:
        return None
    waiting = lagging(state.desired, live)
    if not waiting:
        return {}
    if state.desired_at is None or now - state.desired_at < timedelta(seconds=timeout_s):
        return None
    return {r.instance_id: (f"could not load version {state.desired}: {r.error}" if r.error else
                            f"had not loaded version {state.desired} within {timeout_s:g} s") for r in waiting}


class ReplicaSet:
    """This process among the replicas on its database: its identity, its heartbeat, the flip, and the loop that
    reconciles it with the database."""

    def __init__(self, store: Store, *, liveness: Liveness | None = None, timeout_s: float = 120.0,
                 sync_s: float = 5.0, role: str = "all") -> None:
        self.store = store
        self.liveness = liveness or Liveness()
        self.timeout_s = timeout_s
        """Seconds a promotion waits for every live replica to load it before it flips without the laggards."""
        self.sync_s = sync_s
        """Seconds between two polls of the database (0: no polling; NOTIFY alone on PostgreSQL)."""
        self.host, self.pid = socket.gethostname(), os.getpid()
        # Per process, not per data dir: two processes on one data dir, or a restart, are different replicas.
        self.instance_id = f"{self.host}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.role = role
        self.started_at = datetime.now(UTC)
        self.listening = False
        """Whether the LISTEN connection is up now (PostgreSQL)."""
        self._wake = asyncio.Event()

    @classmethod
    def from_settings(cls, store: Store, settings: StoreSettings, role: str = "all") -> ReplicaSet:
        return cls(store, liveness=Liveness(heartbeat_s=settings.heartbeat_s), timeout_s=settings.promotion_timeout_s,
                   sync_s=settings.policy_sync_s, role=role)

    # --- the database's view ----------------------------------------------------------------------------------

    async def live(self) -> list[ReplicaRow]:
        """Live replicas' rows. On SQLite one process owns the file: only this one counts."""
        now = datetime.now(UTC)
        rows = [r for r in await self.store.list_replicas() if self.liveness.live(r, now)]
        return [r for r in rows if r.instance_id == self.instance_id] if self.store.embedded else rows

    async def beat(self, *, ready: bool, loaded: list[int], serving: int | None, error: str | None,
                   announce: bool = False) -> None:
        """Write this process's heartbeat; ``announce``: its loaded versions changed (NOTIFY the others)."""
        await self.store.beat(ReplicaRow(instance_id=self.instance_id, host=self.host, pid=self.pid, role=self.role,
                                         started_at=self.started_at, last_seen=datetime.now(UTC), ready=ready,
                                         loaded=sorted(set(loaded)), serving=serving, error=error),
                              announce=announce)

    async def try_flip(self) -> PromotionRow:
        """Flip the served version if the condition holds (any replica may; the database makes it happen once);
        returns the promotion row as it is afterwards."""
        state = await self.store.promotion_state()
        laggards = flip_laggards(state, await self.live(), datetime.now(UTC), self.timeout_s)
        if laggards is None:
            return state
        if await self.store.flip(state.desired, self.instance_id, laggards, datetime.now(UTC)):
            if laggards:
                log.warning("version %d is served now without the replicas that had not loaded it within %g s, "
                            "marked not ready: %s", state.desired, self.timeout_s,
                            "; ".join(f"{k}: {v}" for k, v in laggards.items()))
            else:
                log.info("version %d is served now: every live replica has loaded it", state.desired)
        return await self.store.promotion_state()

    async def everywhere(self, version: int) -> bool:
        """Whether every live, ready replica has ``version`` loaded."""
        return not lagging(version, await self.live())

    # --- the loop ---------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Reconcile now (a NOTIFY arrived, or this process changed something)."""
        self._wake.set()

    async def run(self, reconcile: Callable[[], Awaitable[None]], heartbeat: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: heartbeat every period, listen for NOTIFY (PostgreSQL), and ``reconcile`` on each
        notification, every ``sync_s`` and when a pending promotion's timeout runs out."""
        tasks = [asyncio.create_task(self._beat_loop(heartbeat), name="alignd-heartbeat")]
        if not self.store.embedded:
            tasks.append(asyncio.create_task(self._listen(), name="alignd-listen"))
        try:
            while True:
                try:
                    await reconcile()
                except Exception:  # the database may be briefly away; try again next time
                    log.exception("reconciling with the database's promotions failed")
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), await self._next_check())
                except TimeoutError:
                    pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _next_check(self) -> float | None:
        """Seconds until the next poll: ``sync_s``, or sooner when a pending promotion's timeout runs out first."""
        wait = self.sync_s or None
        try:
            state = await self.store.promotion_state()
        except Exception:
            return self.liveness.heartbeat_s
        if state.desired != state.served and state.desired_at is not None:
            left = (state.desired_at + timedelta(seconds=self.timeout_s) - datetime.now(UTC)).total_seconds()
            left = max(0.2, left + 0.1)
            wait = left if wait is None else min(wait, left)
        return wait

    async def _beat_loop(self, heartbeat: Callable[[], Awaitable[None]]) -> None:
        pruned = 0.0
        while True:
            try:
                await heartbeat()
                now = asyncio.get_running_loop().time()
                if now - pruned > self.liveness.prune_after_s / 10:
                    pruned = now
                    await self.store.prune_replicas(datetime.now(UTC) - timedelta(
                        seconds=self.liveness.prune_after_s))
            except Exception:
                log.warning("heartbeat to the database failed", exc_info=True)
            await asyncio.sleep(self.liveness.heartbeat_s)

    async def _listen(self) -> None:
        """LISTEN on a dedicated connection (asyncpg), reconnecting when it is lost; each notification, and each
        (re)connection (to catch up on what was missed), wakes the reconcile loop."""
        import asyncpg

        url = self.store.engine.url
        delay = 1.0
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(user=url.username, password=url.password, host=url.host, port=url.port,
                                             database=url.database, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, lambda *_args: self._wake.set())
                self.listening, delay = True, 1.0
                self._wake.set()
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 10.0)
                    except TimeoutError:
                        await conn.execute("SELECT 1", timeout=10)  # a silently dropped connection shows here
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("listening for promotions failed (polling every %g s meanwhile): %s", self.sync_s, e)
            finally:
                self.listening = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
