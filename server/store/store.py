"""The :class:`Store`: durable storage for completions on SQLite (WAL) or PostgreSQL.

Writes of completions go through a single writer task that commits whatever
has queued up (up to ``batch_max`` records) in one transaction: under load
one fsync serves many requests, and each caller still returns only once its
own record is committed ("group commit").
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgspec
from sqlalchemy import event, insert, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from alignd.store.deletion import DeletionQueries
from alignd.store.faults import Outage, outage, wrap_connect_errors
from alignd.store.feedback import FeedbackQueries, insert_feedback
from alignd.store.keys import KeyQueries
from alignd.store.migrations import SQLITE_BEGIN_IMMEDIATE, migrate
from alignd.store.records import CompletionRecord, FeedbackRecord
from alignd.store.replicas import ReplicaQueries
from alignd.store.shared import SharedQueries
from alignd.store.tables import choices, completions
from alignd.store.training import TrainingQueries
from alignd.store.users import UserQueries

__all__ = ["RecordRejectedError", "Store", "StoreClosedError", "StoreError", "StoreStats"]

_log = logging.getLogger(__name__)

# How long an SQLite connection waits for another writer's lock before giving up.
_SQLITE_BUSY_TIMEOUT_MS = 30_000
# Pooled PostgreSQL connections kept open (and as many more opened under bursts).
_PG_POOL_SIZE = 32
# Bound on bind parameters per ``IN (…)`` when loading choices (both backends allow far more).
_IN_CHUNK = 500
# The readiness probe: how long its query may take, how long its answer is reused, and for how long a write that
# failed for the database's sake (a full disk answers SELECT 1 fine) keeps the database reported down, unless a
# write succeeds meanwhile. Bounded, so that a server taken out of rotation comes back to try again.
_PROBE_TIMEOUT_S = 2.0
_PROBE_CACHE_S = 1.0
_WRITE_FAILURE_S = 10.0


class StoreError(Exception):
    """The store cannot do what was asked (bad URL, unreachable database, failed write, …)."""


class StoreClosedError(StoreError):
    """The store was closed (or is closing) and takes no more work."""


class RecordRejectedError(StoreError):
    """This record cannot be stored (duplicate id, invalid value, …); other records are unaffected."""


@dataclass(slots=True)
class StoreStats:
    """Counters of the group-commit writer (for tests, benchmarks and metrics)."""

    batches: int = 0
    """Transactions committed by the writer (a batch retried record by record counts each retry)."""
    records: int = 0
    """Records (completions, feedback events) committed."""
    failed: int = 0
    """Records whose caller got an exception from the writer."""
    largest_batch: int = 0
    """Most records committed in one transaction."""


@dataclass(slots=True)
class _Pending:
    record: CompletionRecord | FeedbackRecord
    done: asyncio.Future[None]


def _mask_password(raw: str) -> str:
    """Hide the password of a URL that could not even be parsed."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", raw)


def async_url(raw: str) -> URL:
    """Map a user-facing database URL to the async driver SQLAlchemy should use."""
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL {_mask_password(raw)!r}: {exc}") from None
    backend, _, driver = url.drivername.partition("+")  # no driver given: "" (not the sync default)
    if backend in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        return url.set(drivername="postgresql+asyncpg")
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        return url.set(drivername="sqlite+aiosqlite")
    raise StoreError(
        f"unsupported database URL {url.render_as_string(hide_password=True)!r}: "
        "use sqlite:///path.db or postgresql://user:password@host:port/database"
    )


def _is_sqlite_file(url: URL) -> bool:
    database = url.database or ""
    return database not in ("", ":memory:") and not database.startswith("file:")


def _json_dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _set_wal(cursor: Any) -> None:
    """WAL mode, persistent in the file. Switching a new file's journal mode needs its exclusive lock, and SQLite
    answers "database is locked" at once (no busy wait) when several processes open the new file together: retry."""
    for attempt in range(50):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.1)


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    """Per-connection SQLite settings (PRAGMAs are per connection, not per file)."""
    # Let SQLAlchemy's "begin" listener emit BEGIN: the driver's implicit transactions would
    # autocommit DDL and could not be made IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        _set_wal(cursor)
        # In WAL mode NORMAL is still safe against corruption; a power loss may lose the last commits.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Deleted rows' text is overwritten in the file, not left in free pages (retention, per-user deletion).
        cursor.execute("PRAGMA secure_delete=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(SQLITE_BEGIN_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _create_engine(url: URL, *, connect_timeout: float) -> AsyncEngine:
    json_kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": msgspec.json.decode}
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000}, **json_kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        wrap_connect_errors(engine)
        return engine
    # pre_ping: replicas outlive database restarts; a stale pooled connection is replaced, not failed.
    # A pool as wide as the usual concurrency: connections beyond it are opened and closed per use, and a new
    # PostgreSQL connection (TCP, SCRAM, setup) costs more than many queries.
    engine = create_async_engine(url, connect_args={"timeout": connect_timeout}, pool_pre_ping=True,
                                 pool_size=_PG_POOL_SIZE, max_overflow=_PG_POOL_SIZE, **json_kwargs)
    wrap_connect_errors(engine)  # a stopped server: OperationalError, not a bare ConnectionRefusedError
    return engine


def _describe(exc: BaseException) -> str:
    """A short reason for an exception (the driver's message without SQLAlchemy's SQL dump)."""
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {orig or exc}".strip()


def _may_be_one_records_fault(exc: BaseException) -> bool:
    """Whether a failed batch is worth retrying record by record (not a lost connection)."""
    if isinstance(exc, DBAPIError):
        return not exc.connection_invalidated and not isinstance(exc, (OperationalError, InterfaceError))
    return isinstance(exc, (StatementError, ValueError, TypeError, OverflowError))


def _is_rejection(exc: BaseException) -> bool:
    """Whether a single record's failure is the record's fault (as opposed to the database's)."""
    if isinstance(exc, (IntegrityError, DataError)):
        return True
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        return sqlstate.startswith(("22", "23"))  # PostgreSQL data exception / integrity violation
    return isinstance(exc, (StatementError, ValueError, TypeError, OverflowError))


def _what(rec: CompletionRecord | FeedbackRecord) -> str:
    return "completion" if isinstance(rec, CompletionRecord) else "feedback"


def _completion_row(rec: CompletionRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "created": rec.created,
        "model": rec.model,
        "policy_version": rec.policy_version,
        "messages": rec.messages,
        "params": rec.params,
        "user": rec.user,
        "metadata": rec.metadata,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "latency_ms": rec.latency_ms,
        "stream": rec.stream,
        "principal": rec.principal,
    }


def _choice_rows(rec: CompletionRecord) -> list[dict[str, Any]]:
    return [
        {
            "completion_id": rec.id,
            "index": c.index,
            "text": c.text,
            "token_ids": c.token_ids,
            "finish_reason": c.finish_reason,
        }
        for c in rec.choices
    ]


class Store(FeedbackQueries, TrainingQueries, SharedQueries, ReplicaQueries, KeyQueries, DeletionQueries,
            UserQueries):
    """Durable storage for completions, feedback, the registry's rows and API keys; one per process, shared by all
    requests. Rows are deleted by retention and per-user deletion only (:mod:`alignd.store.deletion`).

    Create with :meth:`open` and release with :meth:`close` (or ``async with``).
    All methods must be called from the event loop that opened the store.
    """

    def __init__(self, engine: AsyncEngine, *, display_url: str, batch_max: int, queue_max: int) -> None:
        """Internal: use :meth:`open`, which migrates the database first."""
        self._engine = engine
        # Writer transactions only write: on SQLite take the write lock up front (BEGIN IMMEDIATE).
        self._write_engine = engine.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
        self._display_url = display_url
        self._batch_max = batch_max
        # Backpressure: at most queue_max records are queued or being committed; further callers wait.
        self._slots = asyncio.Semaphore(queue_max)
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()  # None: stop after what is queued
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._run_writer(), name="alignd-store-writer"
        )
        self.stats = StoreStats()  # group-commit counters
        self._write_failed: tuple[float, Outage] | None = None  # the last write's failure, until one succeeds
        self._probe: tuple[float, Outage | None] | None = None  # (when, answer) of the last readiness probe
        self._probing: asyncio.Task[Outage | None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        batch_max: int = 256,
        queue_max: int | None = None,
        connect_timeout: float = 10.0,
    ) -> Store:
        """Connect to ``url``, migrate the schema to the latest version and start the writer.

        ``url`` is ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
        ``postgresql://user:password@host:port/database`` (or ``postgres://``), or
        already-async ``sqlite+aiosqlite://`` / ``postgresql+asyncpg://``. The SQLite
        file's parent directory is created if missing.

        ``batch_max`` bounds the records committed in one transaction; ``queue_max``
        (default ``4 * batch_max``) bounds the records waiting or being committed
        before :meth:`record_completion` callers wait for room. ``connect_timeout``
        (seconds) bounds each PostgreSQL connection attempt.

        Raises :class:`StoreError` (naming the URL, password masked) when the URL is
        invalid or the database cannot be reached or migrated.
        """
        if batch_max < 1:
            raise ValueError(f"batch_max must be at least 1, got {batch_max}")
        queue_max = 4 * batch_max if queue_max is None else queue_max
        if queue_max < 1:
            raise ValueError(f"queue_max must be at least 1, got {queue_max}")
        sa_url = async_url(url)
        display_url = sa_url.render_as_string(hide_password=True)
        if sa_url.get_backend_name() == "sqlite" and _is_sqlite_file(sa_url):
            try:
                Path(sa_url.database or "").parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory for {display_url}: {exc}") from exc
        engine = _create_engine(sa_url, connect_timeout=connect_timeout)
        try:
            await migrate(engine)
        except Exception as exc:
            await engine.dispose()
            reason = _describe(exc)
            if sa_url.password:
                reason = reason.replace(str(sa_url.password), "***")
            raise StoreError(f"cannot open the store at {display_url}: {reason}") from exc
        except BaseException:  # cancelled: still release the connections
            await engine.dispose()
            raise
        return cls(engine, display_url=display_url, batch_max=batch_max, queue_max=queue_max)

    async def close(self) -> None:
        """Commit everything already enqueued, stop the writer and release connections.

        Callers still waiting for room in the queue get :class:`StoreClosedError`.
        Safe to call more than once, and concurrently.
        """
        if self._close_task is None:
            self._closing = True
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._close_task)

    async def _shutdown(self) -> None:
        self._queue.put_nowait(None)  # after every record enqueued so far: they are committed first
        await asyncio.gather(self._writer, return_exceptions=True)
        self._close_sqlite_reader()
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return self._display_url

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine (for queries of other store modules and tests; completions are
        written through :meth:`record_completion` only)."""
        return self._engine

    # ------------------------------------------------------------------ health

    async def check_health(self) -> Outage | None:
        """Whether the database can be used now: None, or how it fails (see :mod:`alignd.store.faults`).

        A cheap query bounded by a short timeout, its answer reused briefly and shared by concurrent callers (probes
        of many replicas and load balancers must not load the database); and a write that failed for the
        database's sake in the last few seconds, none having succeeded since, counts too. Never raises."""
        if self._closing:
            return "unavailable"
        now = time.monotonic()
        if self._write_failed is not None and now - self._write_failed[0] < _WRITE_FAILURE_S:
            return self._write_failed[1]
        if self._probe is not None and now - self._probe[0] < _PROBE_CACHE_S:
            return self._probe[1]
        if self._probing is None:
            self._probing = asyncio.get_running_loop().create_task(self._run_probe())
        try:
            # The caller's answer comes in time; a cancelled query's cleanup (closing its connection) may take longer.
            return await asyncio.wait_for(asyncio.shield(self._probing), _PROBE_TIMEOUT_S)
        except TimeoutError:
            return "timeout"

    async def _run_probe(self) -> Outage | None:
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                async with self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            answer: Outage | None = None
        except TimeoutError:
            answer = "timeout"
        except Exception as exc:
            answer = outage(exc) or "unavailable"
            _log.warning("database probe failed: %s", _describe(exc))  # for the operator, not for /ready's caller
        finally:
            self._probing = None
        self._probe = (time.monotonic(), answer)
        return answer

    def _check_open(self) -> None:
        if self._close_task is not None and self._close_task.done():
            raise StoreClosedError(f"the store at {self._display_url} is closed")

    # ------------------------------------------------------------------ writes

    async def record_completion(self, rec: CompletionRecord) -> None:
        """Store a completion and its choices; return once they are committed.

        Concurrent calls are committed together (group commit). Raises
        :class:`RecordRejectedError` when this record cannot be stored (e.g. its id
        already exists, or ``created`` has no timezone), :class:`StoreClosedError`
        after :meth:`close`, :class:`StoreError` when the database fails. If the
        caller is cancelled after enqueueing, the record is still committed.
        """
        await self._enqueue(rec)

    async def record_feedback(self, rec: FeedbackRecord) -> None:
        """Store a feedback event with its preference pairs and labels; return once they are committed.

        Same group commit and errors as :meth:`record_completion`: :class:`RecordRejectedError` when
        this event cannot be stored (its id or idempotency key already exists, its completion does
        not, ``created`` has no timezone).
        """
        await self._enqueue(rec)

    async def _enqueue(self, rec: CompletionRecord | FeedbackRecord) -> None:
        if rec.created.tzinfo is None or rec.created.utcoffset() is None:
            raise RecordRejectedError(f"{_what(rec)} {rec.id!r}: created must be timezone-aware, got {rec.created!r}")
        if self._closing:
            raise StoreClosedError(f"the store at {self._display_url} is closed")
        async with self._slots:
            if self._closing:  # closed while we waited for room
                raise StoreClosedError(f"the store at {self._display_url} is closed")
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Pending(rec, done))
            await done

    async def _run_writer(self) -> None:
        """Commit queued records in batches until the stop marker; fail leftovers if ever killed."""
        batch: list[_Pending] = []
        try:
            while True:
                first = await self._queue.get()
                if first is None:
                    return
                batch, stop = [first], False
                # Everything that queued while the previous batch committed goes into this one.
                while len(batch) < self._batch_max and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                await self._commit(batch)
                if stop:
                    return
        finally:
            # Only if the writer was cancelled or crashed is anything left undone. Nobody may wait forever.
            self._closing = True
            leftovers = [item for item in batch if not item.done.done()]
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None:
                    leftovers.append(item)
            for item in leftovers:
                self._fail(item, StoreClosedError(f"the store at {self._display_url} stopped before committing"))

    async def _commit(self, batch: Sequence[_Pending]) -> None:
        """Commit ``batch`` in one transaction; on failure, retry each record alone."""
        try:
            await self._insert(batch)
        except Exception as exc:
            if len(batch) > 1 and _may_be_one_records_fault(exc):
                for item in batch:  # isolate the bad record(s): each fails only its own caller
                    await self._commit([item])
                return
            if (reason := outage(exc)) is not None:
                self._write_failed = (time.monotonic(), reason)
                _log.warning("the database failed to store %d record(s): %s", len(batch), _describe(exc))
            for item in batch:
                self._fail(item, self._error_for(item.record, exc))
            return
        self._write_failed = None
        self.stats.batches += 1
        self.stats.records += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for item in batch:
            if not item.done.done():  # the caller may have been cancelled
                item.done.set_result(None)

    async def _insert(self, batch: Sequence[_Pending]) -> None:
        completion_recs = [item.record for item in batch if isinstance(item.record, CompletionRecord)]
        feedback_recs = [item.record for item in batch if isinstance(item.record, FeedbackRecord)]
        completion_rows = [_completion_row(rec) for rec in completion_recs]
        choice_rows = [row for rec in completion_recs for row in _choice_rows(rec)]
        async with self._write_engine.begin() as conn:
            if completion_rows:  # before feedback: an event may refer to a completion of the same batch
                await conn.execute(insert(completions), completion_rows)
            if choice_rows:
                await conn.execute(insert(choices), choice_rows)
            if feedback_recs:
                await insert_feedback(conn, feedback_recs)

    def _error_for(self, rec: CompletionRecord | FeedbackRecord, exc: BaseException) -> StoreError:
        what = _what(rec)
        if _is_rejection(exc):
            error: StoreError = RecordRejectedError(f"{what} {rec.id!r} was not stored: {_describe(exc)}")
        else:
            error = StoreError(f"{what} {rec.id!r} was not stored in {self._display_url}: {_describe(exc)}")
        error.__cause__ = exc
        return error

    def _fail(self, item: _Pending, error: BaseException) -> None:
        self.stats.failed += 1
        if not item.done.done():
            item.done.set_exception(error)
