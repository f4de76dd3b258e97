"""Deleting what users wrote: completions with every row derived from them, by age (retention) or by end user
(a mixin of the Store).

A completion goes with its choices, every feedback event on it (whoever sent it) and those events' preference pairs
and labels: each pair and label copies the completion's prompt and replies. A user's feedback on someone else's
completion goes with its pairs and labels, and the completion stays. Policies, training runs and API keys hold no
user text and are never touched.

Deletions run in bounded batches, each one transaction that removes whole completions (or events), children first,
so that a failure or a restart leaves no half-deleted completion and no long lock: the writer's group commits and
readers interleave between batches. The rows are deleted explicitly rather than by ``ON DELETE CASCADE`` so that
every table's count is known; the cascade still catches an event committed on a completion between the two
statements of a batch (PostgreSQL).

On SQLite the deleted text also leaves the files: ``secure_delete`` (set on every connection) overwrites freed
content, and a checkpoint after the deletion moves the WAL into the database and truncates it (the WAL would
otherwise keep the pages as they were). PostgreSQL keeps dead rows in its files until VACUUM reuses their space.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import Select, and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alignd.store.tables import choices, completions, feedback, labels, preference_pairs

__all__ = ["DELETE_BATCH", "DeletedRows", "DeletionQueries"]

#: Completions (or feedback events) removed per transaction.
DELETE_BATCH = 500


class DeletedRows(msgspec.Struct, kw_only=True):
    """Rows removed (or that a deletion would remove), per table."""

    completions: int = 0
    choices: int = 0
    feedback: int = 0
    preference_pairs: int = 0
    labels: int = 0

    def __add__(self, other: DeletedRows) -> DeletedRows:
        return DeletedRows(**{name: getattr(self, name) + getattr(other, name) for name in self.__struct_fields__})

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.__struct_fields__)


def _user_filters(user: str, principal: str | None) -> tuple[Any, Any]:
    """The conditions on ``completions`` and on ``feedback`` that pick one end user's rows."""
    on_completions = [completions.c.user == user]
    on_feedback = [feedback.c.user == user]
    if principal is not None:
        on_completions.append(completions.c.principal == principal)
        on_feedback.append(feedback.c.principal == principal)
    return and_(*on_completions), and_(*on_feedback)


async def _delete_signal(conn: AsyncConnection, feedback_ids: Any) -> tuple[int, int]:
    """Delete the pairs and labels of these feedback events (a list or a subquery); return how many."""
    pairs = await conn.execute(delete(preference_pairs).where(preference_pairs.c.feedback_id.in_(feedback_ids)))
    unpaired = await conn.execute(delete(labels).where(labels.c.feedback_id.in_(feedback_ids)))
    return pairs.rowcount, unpaired.rowcount


async def _delete_completions(conn: AsyncConnection, ids: Sequence[str]) -> DeletedRows:
    """Delete these completions with everything derived from them, children first."""
    on_them = select(feedback.c.id).where(feedback.c.completion_id.in_(ids)).scalar_subquery()
    pairs, unpaired = await _delete_signal(conn, on_them)
    events = await conn.execute(delete(feedback).where(feedback.c.completion_id.in_(ids)))
    generated = await conn.execute(delete(choices).where(choices.c.completion_id.in_(ids)))
    requests = await conn.execute(delete(completions).where(completions.c.id.in_(ids)))
    return DeletedRows(completions=requests.rowcount, choices=generated.rowcount, feedback=events.rowcount,
                       preference_pairs=pairs, labels=unpaired)


async def _delete_feedback(conn: AsyncConnection, ids: Sequence[str]) -> DeletedRows:
    """Delete these feedback events with their pairs and labels."""
    pairs, unpaired = await _delete_signal(conn, list(ids))
    events = await conn.execute(delete(feedback).where(feedback.c.id.in_(ids)))
    return DeletedRows(feedback=events.rowcount, preference_pairs=pairs, labels=unpaired)


class DeletionQueries:
    """Retention and per-user deletion (a mixin of ``Store``)."""

    _engine: AsyncEngine
    _write_engine: AsyncEngine

    def _check_open(self) -> None:  # provided by Store
        raise NotImplementedError

    async def delete_completions_before(self, cutoff: datetime, *, batch: int = DELETE_BATCH) -> DeletedRows:
        """Delete every completion created before ``cutoff`` (timezone-aware) with its choices, the feedback on it
        and that feedback's pairs and labels, oldest first, ``batch`` completions per transaction."""
        if cutoff.tzinfo is None or cutoff.utcoffset() is None:
            raise ValueError(f"cutoff must be timezone-aware, got {cutoff!r}")
        old = (select(completions.c.id).where(completions.c.created < cutoff)
               .order_by(completions.c.created, completions.c.id).limit(batch))
        return await self._scrubbed(await self._in_batches(old, _delete_completions, batch))

    async def delete_user(self, user: str, *, principal: str | None = None,
                          batch: int = DELETE_BATCH) -> DeletedRows:
        """Delete every row of end user ``user`` (with ``principal``, only the rows made with that principal's
        keys): the user's completions with everything derived from them, then the user's feedback on other
        completions with its pairs and labels. Deleting again finds nothing."""
        on_completions, on_feedback = _user_filters(user, principal)
        theirs = select(completions.c.id).where(on_completions).limit(batch)
        deleted = await self._in_batches(theirs, _delete_completions, batch)
        deleted += await self._in_batches(select(feedback.c.id).where(on_feedback).limit(batch), _delete_feedback,
                                          batch)
        return await self._scrubbed(deleted)

    async def count_user_rows(self, user: str, *, principal: str | None = None) -> DeletedRows:
        """What :meth:`delete_user` would delete now."""
        self._check_open()
        on_completions, on_feedback = _user_filters(user, principal)
        theirs = select(completions.c.id).where(on_completions).scalar_subquery()
        events = select(feedback.c.id).where(or_(feedback.c.completion_id.in_(theirs), on_feedback))
        event_ids = events.scalar_subquery()
        queries: dict[str, Select[Any]] = {
            "completions": select(func.count()).select_from(completions).where(on_completions),
            "choices": select(func.count()).select_from(choices).where(choices.c.completion_id.in_(theirs)),
            "feedback": select(func.count()).select_from(events.subquery()),
            "preference_pairs": select(func.count()).select_from(preference_pairs)
                                .where(preference_pairs.c.feedback_id.in_(event_ids)),
            "labels": select(func.count()).select_from(labels).where(labels.c.feedback_id.in_(event_ids)),
        }
        async with self._engine.connect() as conn:
            return DeletedRows(**{name: (await conn.execute(query)).scalar_one() for name, query in queries.items()})

    async def _scrubbed(self, deleted: DeletedRows) -> DeletedRows:
        """On SQLite, after rows were deleted: checkpoint and truncate the WAL, which still holds their pages."""
        if deleted.total and self._engine.dialect.name == "sqlite":
            async with self._engine.connect() as conn:
                # On the driver's connection: SQLAlchemy's would open a transaction, inside which no checkpoint runs.
                raw = await conn.get_raw_connection()
                await raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    async def _in_batches(self, ids_query: Select[Any], delete_them: Any, batch: int) -> DeletedRows:
        """Select up to ``batch`` ids and delete them in one transaction, until a batch comes up short."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        deleted = DeletedRows()
        while True:
            self._check_open()
            async with self._write_engine.begin() as conn:
                ids = list((await conn.execute(ids_query)).scalars())
                if ids:
                    deleted += await delete_them(conn, ids)
            if len(ids) < batch:
                return deleted
