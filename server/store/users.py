"""End users' trust states and agreement scores (a mixin of the Store).

An operator sets a user's trust state (``trusted``, ``blocked``, or back to ``default``); a training run writes the
agreement score it measured for each user it scored (see :mod:`alignd.trainer.safeguards`). A row exists only for
users one of them touched; every other user is ``default`` and unscored.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alignd.store.tables import end_users

__all__ = ["EndUserRow", "UserQueries", "UserScore"]

TrustName = Literal["default", "trusted", "blocked"]
_SCORE_COLUMNS = ("flagged", "agreement", "judgements", "p_value", "scored_run", "scored")


class EndUserRow(msgspec.Struct, kw_only=True):
    """A row of ``end_users``."""

    user: str
    trust: str
    note: str | None = None
    updated: datetime | None = None
    updated_by: str | None = None
    flagged: bool = False
    agreement: float | None = None
    judgements: int | None = None
    p_value: float | None = None
    scored_run: str | None = None
    scored: datetime | None = None


class UserScore(msgspec.Struct, kw_only=True, frozen=True):
    """What one run measured of one user: how often the consensus of the other users shared their judgements."""

    user: str
    agreement: float
    judgements: int
    p_value: float
    flagged: bool


class UserQueries:
    """Trust states and agreement scores of end users (a mixin of ``Store``)."""

    _engine: AsyncEngine
    _write_engine: AsyncEngine

    def _check_open(self) -> None:  # provided by Store
        raise NotImplementedError

    async def get_end_user(self, user: str) -> EndUserRow | None:
        self._check_open()
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(end_users).where(end_users.c.user == user))).first()
        return EndUserRow(**row._mapping) if row is not None else None

    async def list_end_users(self, *, flagged: bool | None = None, trust: str | None = None,
                             limit: int = 1000) -> list[EndUserRow]:
        """Users with a row, flagged ones first, then by id; filtered by flag and trust state."""
        self._check_open()
        query = select(end_users).order_by(end_users.c.flagged.desc(), end_users.c.user).limit(limit)
        if flagged is not None:
            query = query.where(end_users.c.flagged.is_(flagged))
        if trust is not None:
            query = query.where(end_users.c.trust == trust)
        async with self._engine.connect() as conn:
            return [EndUserRow(**r._mapping) for r in await conn.execute(query)]

    async def trust_states(self) -> dict[str, str]:
        """Every user whose trust state is not ``default``, with it (read by each training run)."""
        self._check_open()
        query = select(end_users.c.user, end_users.c.trust).where(end_users.c.trust != "default")
        async with self._engine.connect() as conn:
            return {r.user: r.trust for r in await conn.execute(query)}

    async def set_trust(self, user: str, trust: TrustName, *, note: str | None, by: str | None,
                        when: datetime) -> EndUserRow:
        """Set ``user``'s trust state (creating the row); returns the row as it now is."""
        self._check_open()
        values = {"trust": trust, "note": note, "updated": when, "updated_by": by}
        async with self._write_engine.begin() as conn:
            await _upsert(conn, [{"user": user, "flagged": False, **values}], list(values))
            row = (await conn.execute(select(end_users).where(end_users.c.user == user))).one()
        return EndUserRow(**row._mapping)

    async def record_scores(self, run_id: str, scores: Sequence[UserScore], when: datetime) -> None:
        """Write a run's agreement scores (users it did not score keep their earlier ones)."""
        self._check_open()
        rows = [{"user": s.user, "trust": "default", "flagged": s.flagged, "agreement": s.agreement,
                 "judgements": s.judgements, "p_value": s.p_value, "scored_run": run_id, "scored": when}
                for s in scores]
        async with self._write_engine.begin() as conn:
            for start in range(0, len(rows), 500):
                await _upsert(conn, rows[start:start + 500], list(_SCORE_COLUMNS))

    async def forget_user_scores(self, user: str) -> None:
        """Drop what runs measured of ``user`` (their data was deleted); an operator's trust state stays."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await conn.execute(delete(end_users).where(end_users.c.user == user, end_users.c.trust == "default"))
            await conn.execute(update(end_users).where(end_users.c.user == user)
                               .values(**{c: None for c in _SCORE_COLUMNS if c != "flagged"}, flagged=False))


async def _upsert(conn: AsyncConnection, rows: list[dict[str, Any]], update_columns: list[str]) -> None:
    """Insert rows of ``end_users``, or update ``update_columns`` of those already there (SQLite and PostgreSQL
    both have ``INSERT … ON CONFLICT DO UPDATE``)."""
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    statement = insert(end_users).values(rows)
    await conn.execute(statement.on_conflict_do_update(
        index_elements=[end_users.c.user], set_={c: statement.excluded[c] for c in update_columns}))
