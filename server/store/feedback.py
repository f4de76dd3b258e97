"""Feedback in the store: rows for the group-commit writer, and the queries of the feedback service and exports.

:class:`FeedbackQueries` is mixed into :class:`~alignd.store.Store`; feedback events are written through
``Store.record_feedback`` (group commit, with their pairs and labels in the same transaction) and read here.
Exports page through the tables by key (``created``, ``id``), so memory stays constant however much is stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from sqlalchemy import Engine, Select, and_, create_engine, event, func, insert, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry

from alignd.store.records import (
    ChoiceRecord,
    CompletionRecord,
    FeedbackRecord,
    StoredFeedback,
    StoredLabel,
    StoredPair,
)
from alignd.store.tables import choices, completions, feedback, labels, preference_pairs

__all__ = ["FeedbackQueries", "insert_feedback"]


def _check_aware(name: str, value: datetime | None) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")


def _feedback_row(rec: FeedbackRecord) -> dict[str, Any]:
    return {
        "id": rec.id, "completion_id": rec.completion_id, "kind": rec.kind, "choice": rec.choice,
        "payload": rec.payload, "user": rec.user, "comment": rec.comment, "tags": rec.tags,
        "idempotency_key": rec.idempotency_key, "request_hash": rec.request_hash,
        "policy_version": rec.policy_version, "pair_count": len(rec.pairs), "label_count": len(rec.labels),
        "created": rec.created, "principal": rec.principal,
    }


async def insert_feedback(conn: AsyncConnection, records: Sequence[FeedbackRecord]) -> None:
    """Insert feedback events with their pairs and labels, inside the writer's transaction."""
    feedback_rows, pair_rows, label_rows = [], [], []
    for rec in records:
        feedback_rows.append(_feedback_row(rec))
        provenance = {"feedback_id": rec.id, "completion_id": rec.completion_id, "kind": rec.kind,
                      "policy_version": rec.policy_version, "created": rec.created, "used_in_run": None}
        pair_rows.extend({**provenance, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                          "chosen_choice": p.chosen_choice, "rejected_choice": p.rejected_choice,
                          "margin": float(p.margin), "weight": float(p.weight)} for p in rec.pairs)
        label_rows.extend({**provenance, "choice": lb.choice, "prompt": lb.prompt, "reply": lb.reply,
                           "good": lb.good, "weight": float(lb.weight)} for lb in rec.labels)
    await conn.execute(insert(feedback), feedback_rows)
    if pair_rows:
        await conn.execute(insert(preference_pairs), pair_rows)
    if label_rows:
        await conn.execute(insert(labels), label_rows)


def _stored_feedback(row: Any) -> StoredFeedback:
    m = row._mapping
    return StoredFeedback(
        id=m["id"], completion_id=m["completion_id"], kind=m["kind"], choice=m["choice"], payload=m["payload"],
        user=m["user"], comment=m["comment"], tags=list(m["tags"]), idempotency_key=m["idempotency_key"],
        request_hash=m["request_hash"], policy_version=m["policy_version"], created=m["created"],
        pair_count=m["pair_count"], label_count=m["label_count"], principal=m["principal"])


def _after(query: Select[Any], table: Any, created: datetime, id_: Any) -> Select[Any]:
    """Keyset pagination: rows strictly after (created, id)."""
    return query.where(or_(table.c.created > created, and_(table.c.created == created, table.c.id > id_)))


def _bucket_start(column: Any, bucket: Literal["hour", "day"], dialect: str) -> Any:
    """SQL for the start of ``column``'s UTC hour or day. The units are literals, not bound parameters: PostgreSQL
    would not see ``date_trunc($1, …)`` in SELECT and ``date_trunc($3, …)`` in GROUP BY as the same expression."""
    if dialect == "sqlite":  # naive UTC text (see UTCDateTime)
        pattern = "%Y-%m-%d %H:00:00" if bucket == "hour" else "%Y-%m-%d 00:00:00"
        return func.strftime(literal_column(f"'{pattern}'"), column)
    return func.date_trunc(literal_column(f"'{bucket}'"), func.timezone(literal_column("'UTC'"), column))


def _as_utc(value: datetime | str) -> datetime:
    """A bucket start read back: text on SQLite, a naive UTC timestamp on PostgreSQL."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _read_only_connection(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA query_only=ON")
        cursor.execute("PRAGMA busy_timeout=5000")  # WAL readers do not wait for writers; this is a safety net
    finally:
        cursor.close()


def _context_queries(completion_id: str, completion: bool, history_kind: str | None) -> tuple[Any, Any]:
    completion_query = history_query = None
    if completion:
        completion_query = (select(completions, choices.c.index.label("choice_index"),
                                   choices.c.text.label("choice_text"), choices.c.finish_reason)
                            .select_from(completions.outerjoin(choices))
                            .where(completions.c.id == completion_id).order_by(choices.c.index))
    if history_kind is not None:
        history_query = (select(feedback).where(feedback.c.completion_id == completion_id,
                                                feedback.c.kind == history_kind)
                         .order_by(feedback.c.created, feedback.c.id))
    return completion_query, history_query


def _context_result(completion_rows: list[Any] | None, history_rows: list[Any] | None
                    ) -> tuple[CompletionRecord | None, list[StoredFeedback]]:
    history = [_stored_feedback(row) for row in history_rows or []]
    if not completion_rows:
        return None, history if completion_rows is None else []
    m = completion_rows[0]._mapping
    return CompletionRecord(
        id=m["id"], created=m["created"], model=m["model"], policy_version=m["policy_version"],
        messages=m["messages"], params=m["params"], user=m["user"], metadata=m["metadata"],
        prompt_tokens=m["prompt_tokens"], completion_tokens=m["completion_tokens"], latency_ms=m["latency_ms"],
        stream=m["stream"], principal=m["principal"],
        choices=[ChoiceRecord(index=r.choice_index, text=r.choice_text, token_ids=[], finish_reason=r.finish_reason)
                 for r in completion_rows if r.choice_index is not None]), history


class FeedbackQueries:
    """Reads of feedback, pairs and labels (a mixin of :class:`~alignd.store.Store`)."""

    _engine: AsyncEngine
    _reader: Engine | None = None

    def _check_open(self) -> None:  # provided by Store
        raise NotImplementedError

    @property
    def embedded(self) -> bool:
        """Whether this is the embedded store (SQLite), which one alignd process owns: every write to it goes
        through this process, so the process may keep what it wrote in memory instead of reading it back."""
        return self._engine.dialect.name == "sqlite"

    async def feedback_context(self, completion_id: str, *, completion: bool = True,
                               history_kind: str | None = None
                               ) -> tuple[CompletionRecord | None, list[StoredFeedback]]:
        """What a feedback event needs, in one round trip: the completion with its choices' texts (without token
        ids: ``token_ids`` is empty), if ``completion``; and with ``history_kind``, the earlier events of that
        kind on it, oldest first. The completion is None when asked for and unknown."""
        completion_query, history_query = _context_queries(completion_id, completion, history_kind)
        return _context_result(*await self._point_reads(completion_query, history_query))

    async def _point_reads(self, *queries: Any) -> list[list[Any] | None]:
        """Run small indexed reads (None: skipped) on one connection. On a SQLite file they run right here on the
        event loop's thread: they take tens of microseconds, far less than the async driver's hops to its thread
        and back (this is the hot path of POST /v1/feedback). Scans (listing, exports) stay asynchronous."""
        self._check_open()
        if (reader := self._sqlite_reader()) is not None:
            with reader.connect() as sync_conn:
                return [sync_conn.execute(q).all() if q is not None else None for q in queries]
        async with self._engine.connect() as conn:
            return [(await conn.execute(q)).all() if q is not None else None for q in queries]

    def _sqlite_reader(self) -> Engine | None:
        """On a SQLite file, a synchronous read-only engine for the event loop's thread (created on first use)."""
        reader = self._reader
        if reader is None and self._engine.dialect.name == "sqlite":
            database = self._engine.url.database or ""
            if database in ("", ":memory:") or database.startswith("file:"):
                return None
            reader = create_engine(self._engine.url.set(drivername="sqlite"),
                                   json_deserializer=msgspec.json.decode)
            event.listen(reader, "connect", _read_only_connection)
            self._reader = reader
        return reader

    def _close_sqlite_reader(self) -> None:
        if self._reader is not None:
            self._reader.dispose()

    async def feedback_by_key(self, idempotency_key: str) -> StoredFeedback | None:
        """The feedback event stored under this idempotency key, if any."""
        [rows] = await self._point_reads(select(feedback).where(feedback.c.idempotency_key == idempotency_key))
        return _stored_feedback(rows[0]) if rows else None
    async def list_feedback(self, *, completion_id: str | None = None, kind: str | None = None,
                            user: str | None = None, since: datetime | None = None,
                            policy_version: int | None = None, after: str | None = None,
                            limit: int = 100) -> list[StoredFeedback]:
        """Feedback events oldest first (by ``created``, then id), filtered; ``after`` is the id of the last event
        of the previous page (unknown id: no rows)."""
        _check_aware("since", since)
        self._check_open()
        query = select(feedback).order_by(feedback.c.created, feedback.c.id).limit(limit)
        for column, value in ((feedback.c.completion_id, completion_id), (feedback.c.kind, kind),
                              (feedback.c.user, user), (feedback.c.policy_version, policy_version)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(feedback.c.created >= since)
        async with self._engine.connect() as conn:
            if after is not None:
                cursor = (await conn.execute(select(feedback.c.created, feedback.c.id)
                                             .where(feedback.c.id == after))).first()
                if cursor is None:
                    return []
                query = _after(query, feedback, cursor.created, cursor.id)
            return [_stored_feedback(row) for row in await conn.execute(query)]

    async def prompts_and_choices(self, completion_ids: Sequence[str]) -> dict[str, tuple[list[Any], list[str]]]:
        """For each completion id: its request messages and its choices' texts (for self-contained event lines)."""
        self._check_open()
        ids = list(dict.fromkeys(completion_ids))
        out: dict[str, tuple[list[Any], list[str]]] = {}
        async with self._engine.connect() as conn:
            for row in await conn.execute(select(completions.c.id, completions.c.messages)
                                          .where(completions.c.id.in_(ids))):
                out[row.id] = (row.messages, [])
            for row in await conn.execute(select(choices.c.completion_id, choices.c.text)
                                          .where(choices.c.completion_id.in_(ids))
                                          .order_by(choices.c.completion_id, choices.c.index)):
                out[row.completion_id][1].append(row.text)
        return out

    async def iter_feedback(self, *, since: datetime | None = None, policy_version: int | None = None,
                            page: int = 500) -> AsyncIterator[list[StoredFeedback]]:
        """Every feedback event oldest first, ``page`` at a time."""
        last: StoredFeedback | None = None
        while True:
            rows = await self.list_feedback(since=since, policy_version=policy_version, limit=page,
                                            after=None if last is None else last.id)
            if not rows:
                return
            yield rows
            last = rows[-1]

    async def iter_pairs(self, *, since: datetime | None = None, policy_version: int | None = None,
                         page: int = 500) -> AsyncIterator[list[StoredPair]]:
        """Every preference pair oldest first, ``page`` at a time."""
        async for rows in self._iter_rows(preference_pairs, since, policy_version, page):
            yield [StoredPair(**row._mapping) for row in rows]

    async def iter_labels(self, *, since: datetime | None = None, policy_version: int | None = None,
                          page: int = 500) -> AsyncIterator[list[StoredLabel]]:
        """Every unpaired label oldest first, ``page`` at a time."""
        async for rows in self._iter_rows(labels, since, policy_version, page):
            yield [StoredLabel(**row._mapping) for row in rows]

    async def _iter_rows(self, table: Any, since: datetime | None, policy_version: int | None,
                         page: int) -> AsyncIterator[list[Any]]:
        _check_aware("since", since)
        base = select(table).order_by(table.c.created, table.c.id).limit(page)
        if since is not None:
            base = base.where(table.c.created >= since)
        if policy_version is not None:
            base = base.where(table.c.policy_version == policy_version)
        last: Any = None
        while True:
            self._check_open()
            query = base if last is None else _after(base, table, last.created, last.id)
            async with self._engine.connect() as conn:  # one short read per page: no long-lived snapshot
                rows = (await conn.execute(query)).all()
            if not rows:
                return
            yield rows
            last = rows[-1]

    async def feedback_volume(self, *, bucket: Literal["hour", "day"], since: datetime | None = None
                              ) -> list[tuple[datetime, str, int]]:
        """How many feedback events of each kind were created per ``bucket`` (UTC): ``(bucket start, kind, count)``
        oldest first, counted in the database so that only one row per bucket and kind comes back."""
        _check_aware("since", since)
        self._check_open()
        start = _bucket_start(feedback.c.created, bucket, self._engine.dialect.name)
        query = (select(start.label("start"), feedback.c.kind, func.count().label("events"))
                 .group_by(start, feedback.c.kind).order_by(start, feedback.c.kind))
        if since is not None:
            query = query.where(feedback.c.created >= since)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [(_as_utc(row.start), row.kind, row.events) for row in rows]

    async def count_feedback(self) -> tuple[int, int, int]:
        """How many feedback events, preference pairs and labels are stored."""
        self._check_open()
        async with self._engine.connect() as conn:
            events, pairs, unpaired = [(await conn.execute(select(func.count()).select_from(table))).scalar_one()
                                       for table in (feedback, preference_pairs, labels)]
        return events, pairs, unpaired
