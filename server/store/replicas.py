"""Replicas' heartbeats and the served name's two-phase promotion (a mixin of the Store).

The flip of the served version is one conditional UPDATE of the ``promotion`` row (``WHERE desired = v AND served
<> v``): replicas racing to perform it find the row locked, re-read it after the winner commits and change nothing,
so it happens once. On PostgreSQL every change a replica should react to is announced with ``NOTIFY`` on
:data:`CHANNEL` in the same transaction (delivered at commit); on SQLite replicas poll.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alignd.store.shared import Fence, check_fence
from alignd.store.tables import policies, promotion, replicas

__all__ = ["CHANNEL", "PromotionRow", "ReplicaQueries", "ReplicaRow", "notify"]

CHANNEL = "alignd_policies"
"""The PostgreSQL NOTIFY channel of promotions, flips, canary changes and loads replicas report."""
PROMOTION = "policy"  # the promotion row's name


class ReplicaRow(msgspec.Struct, kw_only=True):
    """A row of ``replicas``: one process's last heartbeat."""

    instance_id: str
    host: str
    pid: int
    role: str
    started_at: datetime
    last_seen: datetime
    ready: bool
    loaded: list[int]
    serving: int | None
    error: str | None = None


class PromotionRow(msgspec.Struct, kw_only=True):
    """The ``promotion`` row: what was promoted (``desired``) and what the served name means (``served``)."""

    desired: int
    served: int
    desired_at: datetime | None
    served_at: datetime | None
    reason: str | None
    flipped_by: str | None
    laggards: dict[str, str]


async def notify(conn: AsyncConnection, what: str) -> None:
    """Announce ``what`` to listening replicas when this transaction commits (PostgreSQL; SQLite replicas poll)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_notify(:channel, :what)"), {"channel": CHANNEL, "what": what})


class ReplicaQueries:
    """Heartbeats and the promotion row (a mixin of ``Store``)."""

    _engine: AsyncEngine
    _write_engine: AsyncEngine

    def _check_open(self) -> None:  # provided by Store
        raise NotImplementedError

    async def beat(self, row: ReplicaRow, *, announce: bool = False) -> None:
        """Write this process's heartbeat (insert or replace its row); ``announce``: NOTIFY the others (its loaded
        versions changed, which may complete a promotion)."""
        self._check_open()
        values = msgspec.structs.asdict(row)
        async with self._write_engine.begin() as conn:
            # An upsert: this process's heartbeat loop and a load it reports may write at once.
            upsert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(replicas).values(**values)
            await conn.execute(upsert.on_conflict_do_update(index_elements=[replicas.c.instance_id],
                                                            set_={k: v for k, v in values.items()
                                                                  if k != "instance_id"}))
            if announce:
                await notify(conn, f"loaded {row.instance_id}")

    async def list_replicas(self) -> list[ReplicaRow]:
        """Every heartbeat row, the most recently seen first (dead ones too: callers judge liveness)."""
        self._check_open()
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(replicas).order_by(replicas.c.last_seen.desc()))
            return [ReplicaRow(**dict(r._mapping)) for r in rows]

    async def prune_replicas(self, before: datetime) -> int:
        """Delete the rows of replicas last seen before ``before`` (long dead); returns how many."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            return (await conn.execute(delete(replicas).where(replicas.c.last_seen < before))).rowcount

    async def promotion_state(self) -> PromotionRow:
        """The promotion row (created by migration 0010; recreated at the base if someone deleted it)."""
        self._check_open()
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(promotion).where(promotion.c.name == PROMOTION))).first()
        if row is None:
            async with self._write_engine.begin() as conn:
                served = (await conn.execute(select(policies.c.version)
                                             .where(policies.c.status == "promoted"))).scalar() or 0
                await conn.execute(insert(promotion).values(name=PROMOTION, desired=served, served=served,
                                                            laggards={}))
            return await self.promotion_state()
        values = dict(row._mapping)
        values.pop("name")
        return PromotionRow(**values)

    async def set_desired(self, version: int, when: datetime, reason: str | None, fence: Fence | None = None) -> None:
        """Record ``version`` as promoted (desired); the served version follows once replicas have loaded it. With
        ``fence`` (a trainer promoting its candidate): :class:`LeaseLost` (nothing written) unless the trainer lease
        is still the fence's."""
        await self.promotion_state()  # the row exists
        async with self._write_engine.begin() as conn:
            await check_fence(conn, fence)
            await conn.execute(update(promotion).where(promotion.c.name == PROMOTION)
                               .values(desired=version, desired_at=when, reason=reason))
            await notify(conn, f"desired {version}")

    async def flip(self, version: int, by: str, laggards: dict[str, str], when: datetime) -> bool:
        """Make desired ``version`` the served one, once: True when this call did it (False: it was not desired any
        more, or another replica flipped first). In the same transaction ``version``'s row becomes ``promoted``
        (the previous one ``retired``) and the ``laggards`` (``{instance id: why}``) are marked not ready."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            done = await conn.execute(update(promotion)
                                      .where(promotion.c.name == PROMOTION, promotion.c.desired == version,
                                             promotion.c.served != version)
                                      .values(served=version, served_at=when, flipped_by=by, laggards=laggards))
            if done.rowcount != 1:
                return False
            reason = (await conn.execute(select(promotion.c.reason)
                                         .where(promotion.c.name == PROMOTION))).scalar()
            await conn.execute(update(policies).where(policies.c.status == "promoted", policies.c.version != version)
                               .values(status="retired"))
            values: dict[str, Any] = {"status": "promoted", "promoted_at": when}
            if reason is not None:
                values["reason"] = reason
            await conn.execute(update(policies).where(policies.c.version == version).values(**values))
            if laggards:
                await conn.execute(update(replicas).where(replicas.c.instance_id.in_(list(laggards)))
                                   .values(ready=False))
            await notify(conn, f"served {version}")
        return True

    async def announce(self, what: str) -> None:
        """NOTIFY listening replicas of ``what`` (e.g. a canary change) on its own."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await notify(conn, what)
