"""What counts as the database failing, as opposed to a bug or a bad record.

A failing database (unreachable, restarting, its connections terminated, out of disk, too slow) is a condition a
client should retry through: the app answers 503 with ``Retry-After``. A programming error (bad SQL, a missing table)
or a record the database refuses is not, and stays what it is. :func:`outage` tells the two apart from the exception
alone, on both backends.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Outage", "outage", "wrap_connect_errors"]

Outage = Literal["unavailable", "timeout", "full"]
"""unavailable: the database cannot be reached or used now; timeout: it (or the pool) did not answer in time;
full: it is out of disk space."""

# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_OUTAGES: dict[int, Outage] = {
    5: "timeout",  # SQLITE_BUSY: another writer held the lock past busy_timeout
    6: "timeout",  # SQLITE_LOCKED
    7: "unavailable",  # SQLITE_NOMEM
    8: "unavailable",  # SQLITE_READONLY: e.g. the filesystem went read-only
    10: "unavailable",  # SQLITE_IOERR
    11: "unavailable",  # SQLITE_CORRUPT: not transient, but the database failing all the same
    13: "full",  # SQLITE_FULL: "database or disk is full"
    14: "unavailable",  # SQLITE_CANTOPEN
    15: "unavailable",  # SQLITE_PROTOCOL
}


def _postgres_outage(sqlstate: str) -> Outage | None:
    if sqlstate == "53100":  # disk_full
        return "full"
    if sqlstate == "57014":  # query_canceled (statement_timeout)
        return "timeout"
    if sqlstate.startswith(("08", "53", "58")):  # connection exception, insufficient resources, system error
        return "unavailable"
    if sqlstate.startswith("57P"):  # admin or crash shutdown, cannot connect now, idle session timeout
        return "unavailable"
    if sqlstate in ("25006", "40001", "40P01"):  # read-only standby after a failover; serialization; deadlock
        return "unavailable"
    return None


def _one(exc: BaseException) -> Outage | None:
    if isinstance(exc, PoolTimeoutError):  # no pooled connection became free in time
        return "timeout"
    if isinstance(exc, DisconnectionError):
        return "unavailable"
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        if isinstance(orig, sqlite3.Error):
            code = getattr(orig, "sqlite_errorcode", None)
            if code is not None and (found := _SQLITE_OUTAGES.get(code & 0xFF)) is not None:
                return found
        sqlstate = getattr(orig, "sqlstate", None)
        if isinstance(sqlstate, str) and (found := _postgres_outage(sqlstate)) is not None:
            return found
        if exc.connection_invalidated:  # the dialect recognised a lost connection
            return "unavailable"
        if getattr(orig, _CONNECT_FAILURE, False):
            return "unavailable"
    return None


def outage(exc: BaseException) -> Outage | None:
    """The kind of database failure ``exc`` is, following its explicit causes (a :class:`StoreError` wraps the
    driver's error); None when it is not one."""
    from alignd.store.store import RecordRejectedError, StoreClosedError, StoreError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RecordRejectedError):
            return None
        if isinstance(current, StoreClosedError):  # shutting down: another replica, or this one restarted, will do
            return "unavailable"
        if (found := _one(current)) is not None:
            return found
        if isinstance(current, StoreError) and current.__cause__ is None:
            return "unavailable"
        current = current.__cause__
    return None


# Marks the DB-API error that :func:`wrap_connect_errors` raises for a failed connection attempt.
_CONNECT_FAILURE = "alignd_connect_failure"


def wrap_connect_errors(engine: AsyncEngine) -> None:
    """Make a failed connection attempt a SQLAlchemy ``OperationalError`` like every other database error.

    asyncpg lets ``ConnectionRefusedError``, ``TimeoutError`` and its own errors out of ``connect`` as they are, and
    SQLAlchemy wraps only the driver's DB-API errors: a stopped PostgreSQL would surface as a bare ``OSError``,
    which nothing could tell from a failing file read."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def connect(dialect: Dialect, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
        dbapi = dialect.loaded_dbapi
        try:
            return dialect.connect(*cargs, **cparams)
        except dbapi.Error:
            raise
        except Exception as exc:
            error = dbapi.OperationalError(f"cannot connect: {type(exc).__name__}: {exc}")
            sqlstate = getattr(exc, "sqlstate", None)  # asyncpg's server errors (e.g. 57P03, starting up)
            if sqlstate is not None:
                error.sqlstate = sqlstate
            setattr(error, _CONNECT_FAILURE, True)
            raise error from exc
