"""API keys added at run time, in the database so that every replica sees the same ones (a mixin of the Store).

Only a hash of each key is stored. These writes are rare (an operator's) and go straight to the database; the read
of one key is a point read by id, which the request path makes for keys it has not seen lately.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from alignd.store.tables import api_keys

__all__ = ["KeyQueries", "KeyRow", "RoleConflictError"]


class KeyRow(msgspec.Struct, kw_only=True):
    """A row of ``api_keys``."""

    id: str
    name: str
    """The principal the key stands for."""
    role: str
    key_hash: str
    """SHA-256 of the key, hex."""
    created: datetime
    created_by: str | None
    revoked: datetime | None = None
    revoked_by: str | None = None


class RoleConflictError(Exception):
    """The principal already has keys of another role (``role``): a name keeps the role it was first given."""

    def __init__(self, name: str, role: str) -> None:
        super().__init__(f"principal {name!r} has the role {role!r}")
        self.name = name
        self.role = role


def _key_row(row: Any) -> KeyRow:
    return KeyRow(**dict(row._mapping))


class KeyQueries:
    """Reads and writes of ``api_keys`` (a mixin of ``Store``)."""

    _engine: AsyncEngine
    _write_engine: AsyncEngine

    def _check_open(self) -> None:  # provided by Store
        raise NotImplementedError

    async def _point_reads(self, *queries: Any) -> list[list[Any] | None]:  # provided by FeedbackQueries
        raise NotImplementedError

    async def insert_key(self, row: KeyRow, *, reserved: Iterable[tuple[str, str]] = ()) -> None:
        """Store a new key, unless its principal already has another role, among the stored keys (revoked ones
        too: a name that was a ``user`` must not come back as a ``frontend`` that could judge its completions) or
        in ``reserved`` (``(name, role)`` of the configured keys): then :class:`RoleConflictError`."""
        self._check_open()
        for name, role in reserved:
            if name == row.name and role != row.role:
                raise RoleConflictError(name, role)
        async with self._write_engine.begin() as conn:  # on SQLite BEGIN IMMEDIATE: the check and insert are one
            found = (
                await conn.execute(
                    select(api_keys.c.role).where(api_keys.c.name == row.name, api_keys.c.role != row.role).limit(1)
                )
            ).first()
            if found is not None:
                raise RoleConflictError(row.name, found.role)
            await conn.execute(insert(api_keys).values(**msgspec.structs.asdict(row)))

    async def get_key(self, key_id: str) -> KeyRow | None:
        """The stored key with this id, revoked or not."""
        [rows] = await self._point_reads(select(api_keys).where(api_keys.c.id == key_id))
        return _key_row(rows[0]) if rows else None

    async def list_keys(self) -> list[KeyRow]:
        """Every stored key, oldest first, revoked ones included."""
        self._check_open()
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(api_keys).order_by(api_keys.c.created, api_keys.c.id))
            return [_key_row(r) for r in rows]

    async def revoke_key(self, key_id: str, when: datetime, by: str | None) -> KeyRow | None:
        """Mark the key revoked (a key revoked before keeps its first revocation); the row after, or None when
        there is no such key."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked.is_(None))
                .values(revoked=when, revoked_by=by)
            )
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return _key_row(row) if row is not None else None

    async def count_active_keys(self) -> dict[str, int]:
        """Keys not revoked, by role."""
        query = (
            select(api_keys.c.role, func.count().label("active"))
            .where(api_keys.c.revoked.is_(None))
            .group_by(api_keys.c.role)
        )
        [rows] = await self._point_reads(query)
        return {row.role: row.active for row in rows or []}

    async def key_roles(self) -> dict[str, str]:
        """The role of every principal that has (or had) a stored key."""
        self._check_open()
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(api_keys.c.name, api_keys.c.role).distinct())
            return {row.name: row.role for row in rows}
