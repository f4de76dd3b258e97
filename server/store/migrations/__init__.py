"""The schema's history as Alembic revisions (``versions/``), applied when a store opens.

:mod:`alignd.store.tables` is the one definition of the schema; each revision says how a database gets from the one
before it to the next, written out with Alembic operations (a revision is history: it never changes, and never
reads ``tables.py``). ``tests/test_migrations.py`` fails when the tables and the latest revision disagree. A new
revision: change ``tables.py``, then ``alembic revision --autogenerate -m "…"`` from the repository root (the
``[tool.alembic]`` section of pyproject.toml points here; the database is the configured one, ``ALIGND_DATABASE``),
and read what it wrote.

:func:`migrate` runs every pending revision in one transaction under a lock, so several processes may start on one
database at once: on PostgreSQL a transaction-scoped advisory lock, on SQLite ``BEGIN IMMEDIATE`` (the write lock).
A database that alignd's earlier, hand-written runner migrated (table ``schema_migrations``, versions 1 to 3) is
stamped at the matching revision first; revision 0004 then drops that table.
"""

from __future__ import annotations

from pathlib import Path

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, func, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from alignd.store.tables import metadata

__all__ = ["HEAD", "SQLITE_BEGIN_IMMEDIATE", "MigrationError", "migrate", "script_directory"]

#: Execution option read by the store's SQLite ``begin`` listener: start the transaction with
#: ``BEGIN IMMEDIATE`` so that a read-then-write transaction cannot fail on a lock upgrade.
SQLITE_BEGIN_IMMEDIATE = "alignd_sqlite_begin_immediate"

FOLDER = Path(__file__).resolve().parent

# Arbitrary fixed key (b"alignd" as an integer) for pg_advisory_xact_lock: all alignd processes agree on it.
_PG_MIGRATION_LOCK_KEY = 0x616C69676E64
# A migration stuck elsewhere must not hang a starting server forever.
_PG_LOCK_TIMEOUT = "120s"
# The hand-written runner's versions and the revisions that created the same schema.
_LEGACY_VERSIONS = {1: "0001_completions", 2: "0002_feedback", 3: "0003_policies_and_runs"}


class MigrationError(RuntimeError):
    """The database cannot be brought to this code's schema."""


def script_directory() -> ScriptDirectory:
    """The revisions shipped with this alignd."""
    return ScriptDirectory(str(FOLDER))


HEAD: str = script_directory().get_current_head() or ""
"""The latest revision: the schema of :mod:`alignd.store.tables`."""


def _lock(conn: Connection) -> None:
    """Serialize migrators across processes for the rest of the current transaction."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL lock_timeout = '{_PG_LOCK_TIMEOUT}'"))
        conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK_KEY)))
    # SQLite: the transaction was opened with BEGIN IMMEDIATE (see SQLITE_BEGIN_IMMEDIATE).


def _legacy_revision(conn: Connection) -> str | None:
    """The revision matching the old runner's version, if the old runner migrated this database."""
    if not inspect(conn).has_table("schema_migrations") or inspect(conn).has_table("alembic_version"):
        return None
    version = conn.execute(text("SELECT max(version) FROM schema_migrations")).scalar()
    if version is None:  # no step applied (the old runner's version 0): the revisions start from the base
        return None
    if version not in _LEGACY_VERSIONS:
        raise MigrationError(f"database schema version {version} (schema_migrations) is unknown to this alignd; "
                             "upgrade alignd")
    return _LEGACY_VERSIONS[version]


def migrate_sync(conn: Connection) -> str:
    """Bring the database to :data:`HEAD` in one locked transaction; return the revision. ``conn`` must not be in a
    transaction. Use through ``AsyncConnection.run_sync`` or :func:`migrate`."""
    script = script_directory()
    conn.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
    with conn.begin():
        _lock(conn)
        context = MigrationContext.configure(
            conn, opts={"target_metadata": metadata, "script": script,
                        "fn": lambda revision, _context: script._upgrade_revs(HEAD, revision)})
        try:
            if (legacy := _legacy_revision(conn)) is not None:
                context.stamp(script, legacy)
            current = context.get_current_revision()
            if current is not None and current not in {r.revision for r in script.walk_revisions()}:
                raise MigrationError(f"database schema revision {current} is newer than this alignd's ({HEAD}); "
                                     "upgrade alignd")
            with Operations.context(context):  # the revisions' ``op`` is this context's
                context.run_migrations()
            return context.get_current_revision() or ""
        except CommandError as e:  # e.g. a database with several heads
            raise MigrationError(str(e)) from e


async def migrate(engine: AsyncEngine) -> str:
    """Bring the database behind ``engine`` to :data:`HEAD`; return that revision."""
    async with engine.connect() as conn:
        return await conn.run_sync(migrate_sync)
