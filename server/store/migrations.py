"""A tiny versioned migration runner.

The database remembers which steps it has applied in ``schema_migrations``.
:func:`migrate` applies the missing ones in order, each in its own
transaction together with its ``schema_migrations`` row, so a step is either
fully applied or not at all (both SQLite and PostgreSQL have transactional
DDL). Running it again is a no-op, and several processes may run it at once:
on PostgreSQL each transaction first takes a transaction-scoped advisory
lock, on SQLite it starts with ``BEGIN IMMEDIATE`` (the database write lock).

Adding a table (feedback, preference_pairs, …) is one new step: write a
function taking a sync :class:`~sqlalchemy.engine.Connection`, append a
:class:`Migration` to :data:`MIGRATIONS`, and add the same table to
:mod:`alignd.store.tables`. A step creates its tables from its *own*
definitions, never from ``tables.py``: ``tables.py`` is the schema after the
last step, and a step must keep doing exactly what it did when databases
were first migrated with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from alignd.store.tables import NULLABLE_JSON, UTCDateTime, schema_migrations
from alignd.store.tables import metadata as current_metadata

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "SQLITE_BEGIN_IMMEDIATE",
    "Migration",
    "MigrationError",
    "current_version",
    "migrate",
]

#: Execution option read by the store's SQLite ``begin`` listener: start the transaction with
#: ``BEGIN IMMEDIATE`` so that a read-then-write transaction cannot fail on a lock upgrade.
SQLITE_BEGIN_IMMEDIATE = "alignd_sqlite_begin_immediate"

# Arbitrary fixed key (b"alignd" as an integer) for pg_advisory_xact_lock: all alignd processes agree on it.
_PG_MIGRATION_LOCK_KEY = 0x616C69676E64
# A migration stuck elsewhere must not hang a starting server forever.
_PG_LOCK_TIMEOUT = "120s"


class MigrationError(RuntimeError):
    """The database cannot be brought to this code's schema version."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: ``apply`` runs inside a transaction on a sync connection."""

    version: int
    name: str
    apply: Callable[[Connection], None]


def _v1_completions_and_choices(conn: Connection) -> None:
    """Create ``completions`` and ``choices`` (schema as of version 1, frozen here)."""
    md = MetaData(naming_convention=current_metadata.naming_convention)
    Table(
        "completions",
        md,
        Column("id", Text, primary_key=True),
        Column("created", UTCDateTime, nullable=False),
        Column("model", Text, nullable=False),
        Column("policy_version", Integer, nullable=False),
        Column("messages", JSON, nullable=False),
        Column("params", JSON, nullable=False),
        Column("user", Text, nullable=True),
        Column("metadata", NULLABLE_JSON, nullable=True),
        Column("prompt_tokens", Integer, nullable=False),
        Column("completion_tokens", Integer, nullable=False),
        Column("latency_ms", Float, nullable=False),
        Column("stream", Boolean, nullable=False),
        Index(None, "created"),
        Index(None, "policy_version"),
    )
    Table(
        "choices",
        md,
        Column("completion_id", Text, nullable=False),
        Column("index", Integer, nullable=False, autoincrement=False),
        Column("text", Text, nullable=False),
        Column("token_ids", JSON, nullable=False),
        Column("finish_reason", Text, nullable=True),
        PrimaryKeyConstraint("completion_id", "index"),
        ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
    )
    md.create_all(conn, checkfirst=False)


def _v2_feedback_pairs_labels(conn: Connection) -> None:
    """Create ``feedback``, ``preference_pairs`` and ``labels`` (schema as of version 2, frozen here)."""
    md = MetaData(naming_convention=current_metadata.naming_convention)
    Table("completions", md, Column("id", Text, primary_key=True))  # referred to; already exists
    Table(
        "feedback",
        md,
        Column("id", Text, primary_key=True),
        Column("completion_id", Text, nullable=False),
        Column("kind", Text, nullable=False),
        Column("choice", Integer, nullable=True),
        Column("payload", JSON, nullable=False),
        Column("user", Text, nullable=True),
        Column("comment", Text, nullable=True),
        Column("tags", JSON, nullable=False),
        Column("idempotency_key", Text, nullable=True),
        Column("request_hash", Text, nullable=True),
        Column("policy_version", Integer, nullable=False),
        Column("pair_count", Integer, nullable=False),
        Column("label_count", Integer, nullable=False),
        Column("created", UTCDateTime, nullable=False),
        ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        Index(None, "completion_id", "kind"),
        Index(None, "created"),
        Index(None, "idempotency_key", unique=True),
    )
    provenance = ("feedback_id", "completion_id", "kind", "policy_version")
    Table(
        "preference_pairs",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        *(Column(name, Integer if name == "policy_version" else Text, nullable=False) for name in provenance),
        Column("prompt", JSON, nullable=False),
        Column("chosen", Text, nullable=False),
        Column("rejected", Text, nullable=False),
        Column("chosen_choice", Integer, nullable=True),
        Column("rejected_choice", Integer, nullable=True),
        Column("margin", Float, nullable=False),
        Column("weight", Float, nullable=False),
        Column("used_in_run", Text, nullable=True),
        Column("created", UTCDateTime, nullable=False),
        ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE"),
        Index(None, "feedback_id"),
        Index(None, "created"),
    )
    Table(
        "labels",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        *(Column(name, Integer if name == "policy_version" else Text, nullable=False) for name in provenance),
        Column("choice", Integer, nullable=True),
        Column("prompt", JSON, nullable=False),
        Column("reply", Text, nullable=False),
        Column("good", Boolean, nullable=False),
        Column("weight", Float, nullable=False),
        Column("used_in_run", Text, nullable=True),
        Column("created", UTCDateTime, nullable=False),
        ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE"),
        Index(None, "feedback_id"),
        Index(None, "created"),
    )
    for name in ("feedback", "preference_pairs", "labels"):
        md.tables[name].create(conn, checkfirst=False)


def _v3_policies_and_runs(conn: Connection) -> None:
    """Create ``policies`` and ``training_runs`` (schema as of version 3, frozen here)."""
    md = MetaData(naming_convention=current_metadata.naming_convention)
    Table(
        "policies",
        md,
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("status", Text, nullable=False),
        Column("parent", Integer, nullable=True),
        Column("run_id", Text, nullable=True),
        Column("adapter_path", Text, nullable=True),
        Column("metrics", JSON, nullable=False),
        Column("reason", Text, nullable=True),
        Column("created", UTCDateTime, nullable=False),
        Column("promoted_at", UTCDateTime, nullable=True),
        Index(None, "status"),
    )
    Table(
        "training_runs",
        md,
        Column("id", Text, primary_key=True),
        Column("status", Text, nullable=False),
        Column("phase", Text, nullable=False),
        Column("progress", Float, nullable=False),
        Column("trigger", Text, nullable=False),
        Column("parent", Integer, nullable=False),
        Column("candidate", Integer, nullable=True),
        Column("promoted", Boolean, nullable=False),
        Column("config", JSON, nullable=False),
        Column("metrics", JSON, nullable=False),
        Column("error", Text, nullable=True),
        Column("created", UTCDateTime, nullable=False),
        Column("finished", UTCDateTime, nullable=True),
        Index(None, "status"),
        Index(None, "created"),
    )
    for name in ("policies", "training_runs"):
        md.tables[name].create(conn, checkfirst=False)


#: Every step, in order. Versions are consecutive and never reused; append only.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "completions and choices", _v1_completions_and_choices),
    Migration(2, "feedback, preference pairs and labels", _v2_feedback_pairs_labels),
    Migration(3, "policies and training runs", _v3_policies_and_runs),
)

LATEST_VERSION: int = MIGRATIONS[-1].version


def _lock(conn: Connection) -> None:
    """Serialize migrators across processes for the rest of the current transaction."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL lock_timeout = '{_PG_LOCK_TIMEOUT}'"))
        conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK_KEY)))
    # SQLite: the transaction was opened with BEGIN IMMEDIATE (see SQLITE_BEGIN_IMMEDIATE).


def current_version(conn: Connection) -> int:
    """The highest applied migration version, 0 for an empty database."""
    if not conn.dialect.has_table(conn, schema_migrations.name):
        return 0
    return conn.execute(select(func.coalesce(func.max(schema_migrations.c.version), 0))).scalar_one()


def _check_steps() -> None:
    versions = [m.version for m in MIGRATIONS]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must be 1, 2, 3, … in order, got {versions}")


def migrate_sync(conn: Connection) -> int:
    """Apply every pending step, one transaction each; return the resulting version.

    ``conn`` must not be in a transaction. Use through ``AsyncConnection.run_sync``
    or :func:`migrate`.
    """
    _check_steps()
    conn.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
    while True:
        with conn.begin():
            _lock(conn)
            schema_migrations.create(conn, checkfirst=True)
            version = current_version(conn)
            if version > LATEST_VERSION:
                raise MigrationError(
                    f"database schema version {version} is newer than this alignd's ({LATEST_VERSION}); upgrade alignd"
                )
            if version == LATEST_VERSION:
                return version
            step = MIGRATIONS[version]  # versions are 1-based and consecutive
            step.apply(conn)
            conn.execute(
                insert(schema_migrations).values(version=step.version, name=step.name, applied=datetime.now(UTC))
            )


async def migrate(engine: AsyncEngine) -> int:
    """Bring the database behind ``engine`` to :data:`LATEST_VERSION`; return that version."""
    async with engine.connect() as conn:
        return await conn.run_sync(migrate_sync)
