"""State that replicas on one database share through it (a mixin of the Store): adapter blobs, the trainer lease with
its runs' heartbeats, and the feedback quota's counters.

Mutual exclusion comes from the database: on SQLite every write transaction takes the file's write lock up front
(``BEGIN IMMEDIATE``); on PostgreSQL the few writes that read before they write take a transaction-scoped advisory
lock (``pg_advisory_xact_lock``, released at commit, so it also works behind PgBouncer's transaction pooling).
Times are the writing process's UTC clock: replicas' clocks must agree to well under the lease (NTP does).

The lease carries a fencing token, its ``generation``, one more at every takeover. A run records the generation it
started under, and its trainer's writes that matter (registering and promoting its candidate, marking its signal
used, its run row) carry a :class:`Fence` that the write's own transaction checks under ``LOCK_LEASE``: a trainer that
was paused past its lease (a GC pause, SIGSTOP, a partition) while another process took the lease over and failed its
run finds :class:`LeaseLost` when it wakes, and nothing it writes lands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alignd.store.tables import adapter_blobs, policies, quota_counters, trainer_lease, training_runs

__all__ = ["LOCK_LEASE", "LOCK_REGISTER", "Fence", "LeaseLost", "SharedQueries", "check_fence", "serialize"]

# Advisory lock keys (any bigint; these spell "alignd" and a number).
LOCK_REGISTER = 0x616C69676E6401
LOCK_PROMOTE = 0x616C69676E6402
LOCK_LEASE = 0x616C69676E6403
LOCK_QUOTA = 0x616C69676E6404


async def serialize(conn: AsyncConnection, key: int) -> None:
    """Hold ``key`` until this transaction ends (PostgreSQL); SQLite's write transactions are serial already."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


class Fence(msgspec.Struct, frozen=True):
    """A fencing token: the trainer lease's holder and the generation it held it at. A write carrying it lands only
    while the lease still has both."""

    holder: str
    generation: int


class LeaseLost(Exception):
    """A fenced write was refused: the lease is no longer the fence's holder's at that generation (another process
    took it over meanwhile). The transaction wrote nothing."""


async def check_fence(conn: AsyncConnection, fence: Fence | None, name: str = "trainer") -> None:
    """Raise :class:`LeaseLost` unless lease ``name`` still has ``fence``'s holder and generation (None: no check).
    Takes ``LOCK_LEASE`` first (SQLite's write transactions are serial already), so no takeover commits between this
    check and the transaction's writes; call it before any other lock (takeovers take ``LOCK_LEASE`` alone)."""
    if fence is None:
        return
    await serialize(conn, LOCK_LEASE)
    row = (await conn.execute(select(trainer_lease.c.holder, trainer_lease.c.generation)
                              .where(trainer_lease.c.name == name))).first()
    if row is None or row.holder != fence.holder or row.generation != fence.generation:
        now = f"{row.holder} holds it at generation {row.generation}" if row is not None else "nobody holds it"
        raise LeaseLost(f"{fence.holder} no longer holds the {name} lease it held at generation {fence.generation} "
                        f"({now})")


class SharedQueries:
    """Blobs, the trainer lease and quota counters (a mixin of ``Store``)."""

    _engine: AsyncEngine
    _write_engine: AsyncEngine

    def _check_open(self) -> None:  # provided by Store
        raise NotImplementedError

    # --- adapter blobs ----------------------------------------------------------------------------------------

    async def fetch_blobs(self, shas: Iterable[str]) -> dict[str, bytes]:
        """The stored bytes of these SHA-256s (missing ones are left out; the caller verifies what it got)."""
        self._check_open()
        wanted = sorted(set(shas))
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(adapter_blobs.c.sha256, adapter_blobs.c.data)
                                      .where(adapter_blobs.c.sha256.in_(wanted)))
            return {r.sha256: bytes(r.data) for r in rows}

    # --- the base model ---------------------------------------------------------------------------------------

    async def record_base_model(self, identity: dict[str, Any]) -> dict[str, Any]:
        """The base model's identity as the database records it (in version 0's ``metrics.base_model``): the one
        recorded before, or ``identity``, recorded now when there was none (the first start). Nothing is written
        when one is recorded already, whatever it says."""
        self._check_open()
        now = datetime.now(UTC)
        async with self._write_engine.begin() as conn:
            await serialize(conn, LOCK_REGISTER)  # two first starts: one inserts version 0
            base = (await conn.execute(select(policies.c.metrics).where(policies.c.version == 0))).first()
            if base is not None and (base.metrics or {}).get("base_model"):
                return dict(base.metrics["base_model"])
            if base is None:
                await conn.execute(insert(policies).values(
                    version=0, status="promoted", parent=None, run_id=None, adapter_path=None,
                    metrics={"base_model": identity}, reason="the base model", created=now, promoted_at=now))
            else:
                await conn.execute(update(policies).where(policies.c.version == 0)
                                   .values(metrics={**(base.metrics or {}), "base_model": identity}))
        return identity

    # --- the trainer lease ------------------------------------------------------------------------------------

    async def acquire_lease(self, holder: str, ttl_s: float, name: str = "trainer") -> str | None:
        """Take the lease ``name`` for ``ttl_s`` seconds if it is free, expired or already ``holder``'s (then it is
        extended). Returns None when ``holder`` holds it now, else the live holder's id."""
        taken = await self.take_lease(holder, ttl_s, name)
        return None if isinstance(taken, Fence) else taken

    async def take_lease(self, holder: str, ttl_s: float, name: str = "trainer") -> Fence | str:
        """:meth:`acquire_lease`, returning the :class:`Fence` ``holder`` holds the lease with now (taking it over
        from another holder is a new generation; extending its own keeps it), else the live holder's id."""
        self._check_open()
        now = datetime.now(UTC)
        async with self._write_engine.begin() as conn:
            await serialize(conn, LOCK_LEASE)
            row = (await conn.execute(select(trainer_lease).where(trainer_lease.c.name == name))).first()
            values = {"holder": holder, "expires_at": now + timedelta(seconds=ttl_s)}
            if row is None:
                # Released leases are deleted: start above every generation a run recorded, so that no earlier
                # holder's fence matches again.
                top = (await conn.execute(select(func.max(training_runs.c.lease_generation)))).scalar()
                generation = (top or 0) + 1
                await conn.execute(insert(trainer_lease).values(name=name, acquired=now, generation=generation,
                                                                **values))
            elif row.holder == holder:
                generation = row.generation
                await conn.execute(update(trainer_lease).where(trainer_lease.c.name == name).values(**values))
            elif row.expires_at <= now:
                generation = row.generation + 1
                # Conditional: a heartbeat of the old holder may have renewed it since it was read (PostgreSQL).
                taken = await conn.execute(update(trainer_lease)
                                           .where(trainer_lease.c.name == name, trainer_lease.c.holder == row.holder,
                                                  trainer_lease.c.generation == row.generation,
                                                  trainer_lease.c.expires_at <= now)
                                           .values(acquired=now, generation=generation, **values))
                if taken.rowcount != 1:
                    return str(row.holder)
            else:
                return str(row.holder)
        return Fence(holder, generation)

    async def heartbeat(self, holder: str, ttl_s: float, run_id: str | None = None, name: str = "trainer",
                        generation: int | None = None) -> bool:
        """Extend ``holder``'s lease (at ``generation``, when given: the one its run started under) and stamp its
        run's heartbeat, in one transaction; False (nothing written) when the lease is no longer ``holder``'s at that
        generation: another process took it after it expired."""
        self._check_open()
        now = datetime.now(UTC)
        held = [trainer_lease.c.name == name, trainer_lease.c.holder == holder]
        if generation is not None:
            held.append(trainer_lease.c.generation == generation)
        async with self._write_engine.begin() as conn:
            renewed = await conn.execute(update(trainer_lease).where(*held)
                                         .values(expires_at=now + timedelta(seconds=ttl_s)))
            if renewed.rowcount != 1:
                return False
            if run_id is not None:
                await conn.execute(update(training_runs).where(training_runs.c.id == run_id)
                                   .values(heartbeat=now))
        return True

    async def release_lease(self, holder: str, name: str = "trainer") -> None:
        """Give the lease up, if ``holder`` still holds it."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await conn.execute(delete(trainer_lease).where(trainer_lease.c.name == name,
                                                           trainer_lease.c.holder == holder))

    async def lease_generation(self, name: str = "trainer") -> int | None:
        """The lease's generation (None while no row: it was never taken, or given back)."""
        self._check_open()
        async with self._engine.connect() as conn:
            return (await conn.execute(select(trainer_lease.c.generation)
                                       .where(trainer_lease.c.name == name))).scalar()

    async def lease_holder(self, name: str = "trainer") -> tuple[str, datetime] | None:
        """Who holds the lease and until when (an expired lease is still returned: nobody took it yet)."""
        self._check_open()
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(trainer_lease).where(trainer_lease.c.name == name))).first()
        return (row.holder, row.expires_at) if row is not None else None

    async def orphaned_runs(self, name: str = "trainer") -> list[str]:
        """Runs still ``running`` whose holder holds no live lease: their trainer stopped heartbeating."""
        self._check_open()
        now = datetime.now(UTC)
        async with self._engine.connect() as conn:
            # Runs before the lease: a run is inserted after its holder took the lease, so one seen here has its
            # holder's lease visible below.
            runs = (await conn.execute(select(training_runs.c.id, training_runs.c.holder)
                                       .where(training_runs.c.status == "running"))).all()
            lease = (await conn.execute(select(trainer_lease).where(trainer_lease.c.name == name))).first()
        live = lease.holder if lease is not None and lease.expires_at > now else None
        return [r.id for r in runs if r.holder is None or r.holder != live]

    async def fail_orphaned_runs(self, holder: str, error: Callable[[str | None], str],
                                 name: str = "trainer") -> list[str]:
        """As the lease's live holder, mark failed every ``running`` run that is not ``holder``'s (only the holder
        runs training, so their trainers are gone), with ``error(its dead holder's id)`` as the reason; returns their
        ids. Nothing changes when ``holder`` does not hold the lease."""
        self._check_open()
        now = datetime.now(UTC)
        async with self._write_engine.begin() as conn:
            await serialize(conn, LOCK_LEASE)
            lease = (await conn.execute(select(trainer_lease).where(trainer_lease.c.name == name))).first()
            if lease is None or lease.holder != holder or lease.expires_at <= now:
                return []
            orphans = [(r.id, r.holder) for r in await conn.execute(
                select(training_runs.c.id, training_runs.c.holder).where(training_runs.c.status == "running"))
                if r.holder != holder]
            for run_id, dead in orphans:  # rarely more than one: the last holder's run
                await conn.execute(update(training_runs).where(training_runs.c.id == run_id)
                                   .values(status="failed", error=error(dead), finished=now))
        return [run_id for run_id, _ in orphans]

    # --- the feedback quota -----------------------------------------------------------------------------------

    async def take_quota(self, key: str, limit: int, window_s: int, now: float) -> float:
        """Count one event of ``key`` against ``limit`` per ``window_s`` seconds, shared by every process on this
        database: 0 when allowed, else the seconds to wait (the refused event is not counted).

        A sliding window estimated from two fixed ones (this window's count, plus the previous window's weighted
        by how much of it the sliding window still covers), so no burst of twice the limit at a window's edge.
        Exact under concurrency: the counter row is written (and locked) before it is read back, in one transaction.
        """
        self._check_open()
        window = int(now // window_s) * window_s
        covered = 1.0 - (now - window) / window_s  # of the previous window, by the sliding one ending now
        async with self._write_engine.begin() as conn:
            updated = await conn.execute(update(quota_counters)
                                         .where(quota_counters.c.key == key, quota_counters.c.window == window)
                                         .values(count=quota_counters.c.count + 1))
            if updated.rowcount == 0:
                await serialize(conn, LOCK_QUOTA)  # two first events of a window: one inserts
                updated = await conn.execute(update(quota_counters)
                                             .where(quota_counters.c.key == key, quota_counters.c.window == window)
                                             .values(count=quota_counters.c.count + 1))
                if updated.rowcount == 0:
                    await conn.execute(insert(quota_counters).values(key=key, window=window, count=1))
            counts = dict((await conn.execute(
                select(quota_counters.c.window, quota_counters.c.count)
                .where(quota_counters.c.key == key, quota_counters.c.window.in_((window, window - window_s))))).all())
            current, previous = counts.get(window, 1), counts.get(window - window_s, 0)
            if previous * covered + current <= limit:
                return 0.0
            await conn.execute(update(quota_counters)  # refused: not counted
                               .where(quota_counters.c.key == key, quota_counters.c.window == window)
                               .values(count=quota_counters.c.count - 1))
        if current > limit:  # this window alone is full: wait for the next, then for this one to fade enough
            return window + window_s - now + window_s * (1.0 - (limit - 1) / (current - 1))
        # Wait until the previous window's weight leaves room: previous * covered' + current <= limit.
        return max(1.0, math.ceil(window_s * (covered - (limit - current) / previous)))

    async def forget_quota_windows(self, before: int) -> None:
        """Delete counters of windows that started before ``before`` (epoch seconds): no sliding window needs them."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await conn.execute(delete(quota_counters).where(quota_counters.c.window < before))
