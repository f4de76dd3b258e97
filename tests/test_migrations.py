# ruff: noqa: F811 - the store fixtures are imported from test_store and used as parameters
"""The schema's Alembic revisions, on SQLite and PostgreSQL: a fresh database reaches the head, databases of earlier
alignd versions (the hand-written runner's schema versions) upgrade in place with their rows, several processes
may start at once, a failing revision leaves no trace, and the latest revision agrees with ``tables.py``."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from alignd.store import HEAD, Store, StoreError, migrations
from alignd.store import feedback as feedback_module
from alignd.store import store as store_module
from alignd.store.store import async_url
from alignd.store.tables import metadata
from tests.store_reads import count_completions
from tests.test_feedback_store import make_feedback
from tests.test_store import make_record, schema_revision, store_url  # noqa: F401 - the fixture, on both databases

FROZEN = Path(__file__).parent / "data"
_ADDED_SINCE_V3 = {"principal"}  # columns of completions and feedback that revision 0005 added


async def _on(url: str, work) -> object:  # type: ignore[no-untyped-def]
    """Run ``work(sync connection)`` in one committed transaction on the database at ``url``."""
    if url.startswith("sqlite"):
        Path(sa.make_url(url).database or "").parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        await engine.dispose()


def _differences(conn: Connection, target: sa.MetaData = metadata) -> list[object]:
    return compare_metadata(MigrationContext.configure(conn), target)


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def _legacy_schema(dialect: str, tables: set[str] | None = None) -> list[str]:
    """The statements of the schema alignd's old runner left at version 3 (optionally only some tables')."""
    statements = [s.strip() for s in (FROZEN / f"schema_v3_{dialect}.sql").read_text().split(";\n") if s.strip()]
    statements = [re.sub(r"^(--.*\n)+", "", s) for s in statements]
    if tables is None:
        return statements
    return [s for s in statements if re.search(r"(TABLE|ON) (\w+)", s).group(2) in tables]  # type: ignore[union-attr]


async def test_a_fresh_database_reaches_head_once(store_url: str) -> None:
    async with await Store.open(store_url) as first:
        assert await schema_revision(first) == HEAD
        await first.record_completion(make_record(1))
    async with await Store.open(store_url) as second:  # migrating again changes nothing
        assert await schema_revision(second) == HEAD
        assert await count_completions(second) == 1
    assert "schema_migrations" not in await _on(store_url, _tables)


async def test_the_latest_revision_agrees_with_tables_py(store_url: str) -> None:
    """What ``alembic revision --autogenerate`` would find: nothing. A changed table would be found."""
    async with await Store.open(store_url):
        pass
    assert await _on(store_url, _differences) == []
    changed = sa.MetaData()
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["feedback"].append_column(sa.Column("added_later", sa.Text(), nullable=True))
    found = await _on(store_url, lambda conn: _differences(conn, changed))
    assert [(d[0], d[3].name) for d in found] == [("add_column", "added_later")]  # type: ignore[index]


async def test_concurrent_opens_migrate_once(store_url: str) -> None:
    """Several servers starting at once on an empty database (advisory lock / BEGIN IMMEDIATE)."""
    stores = await asyncio.gather(*(Store.open(store_url) for _ in range(4)))
    try:
        assert [await schema_revision(s) for s in stores] == [HEAD] * 4
        rows = await _on(store_url, lambda c: c.execute(text("SELECT version_num FROM alembic_version")).all())
        assert [tuple(r) for r in rows] == [(HEAD,)]  # type: ignore[union-attr]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


@pytest.mark.parametrize("version", [0, 1, 3])
async def test_a_database_of_the_old_runner_upgrades_in_place(store_url: str, version: int) -> None:
    """An earlier alignd's database (schema version 1 or 3 in ``schema_migrations``) keeps its rows; an empty
    ``schema_migrations`` (version 0 to the old runner) starts from the first revision."""
    dialect = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    tables = {0: {"schema_migrations"}, 1: {"completions", "choices", "schema_migrations"}, 3: None}[version]

    def build(conn: Connection) -> None:
        for statement in _legacy_schema(dialect, tables):
            conn.exec_driver_sql(statement)
        for step in range(1, version + 1):
            conn.execute(text("INSERT INTO schema_migrations (version, name, applied) "
                              "VALUES (:v, :n, CURRENT_TIMESTAMP)"), {"v": step, "n": f"step {step}"})

    await _on(store_url, build)
    async with await Store.open(store_url) as store:
        assert await schema_revision(store) == HEAD
        await store.record_completion(make_record(1))
        await store.record_feedback(make_feedback(1))
        assert await store.count_feedback() == (1, 1, 2)
    assert await _on(store_url, _differences) == []
    assert "schema_migrations" not in await _on(store_url, _tables)


async def test_rows_written_before_the_upgrade_survive_it(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dialect = "sqlite" if store_url.startswith("sqlite") else "postgresql"

    def build(conn: Connection) -> None:
        for statement in _legacy_schema(dialect):
            conn.exec_driver_sql(statement)
        conn.execute(text("INSERT INTO schema_migrations (version, name, applied) "
                          "VALUES (3, 'v3', CURRENT_TIMESTAMP)"))

    await _on(store_url, build)
    # Rows written by the store's own code before Alembic ever ran, as an earlier alignd wrote them: without the
    # columns added since.
    monkeypatch.setattr(migrations, "migrate_sync", lambda conn: "legacy")
    for module, builder in ((store_module, "_completion_row"), (feedback_module, "_feedback_row")):
        current = getattr(module, builder)
        monkeypatch.setattr(module, builder, lambda rec, current=current: {
            k: v for k, v in current(rec).items() if k not in _ADDED_SINCE_V3})
    async with await Store.open(store_url) as old:
        await old.record_completion(make_record(7))
        await old.record_feedback(make_feedback(7, completion_id="chatcmpl-000007"))
    monkeypatch.undo()
    async with await Store.open(store_url) as store:
        assert await schema_revision(store) == HEAD
        assert await count_completions(store) == 1
        assert await store.count_feedback() == (1, 1, 2)


async def test_a_failing_revision_leaves_no_trace(store_url: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pending revision runs in one transaction: on an empty database 0001 to the head and a broken one after
    them are pending, and when the last fails, none of the others' tables remain either."""
    folder = tmp_path / "migrations"
    shutil.copytree(migrations.FOLDER, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / "0099_broken.py").write_text(
        'from alembic import op\nimport sqlalchemy as sa\n'
        f'revision = "0099_broken"\ndown_revision = "{HEAD}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        'def upgrade():\n    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))\n'
        '    raise RuntimeError("revision failed midway")\n')
    monkeypatch.setattr(migrations, "FOLDER", folder)
    monkeypatch.setattr(migrations, "HEAD", "0099_broken")
    with pytest.raises(StoreError, match="revision failed midway"):
        await Store.open(store_url)
    monkeypatch.undo()
    assert await _on(store_url, _tables) == set()  # not even alembic_version or 0001's completions
    async with await Store.open(store_url) as store:
        assert await schema_revision(store) == HEAD
    assert "half_done" not in await _on(store_url, _tables)


async def test_a_database_newer_than_the_code_is_refused(store_url: str) -> None:
    async with await Store.open(store_url):
        pass
    await _on(store_url, lambda c: c.execute(text("UPDATE alembic_version SET version_num = '0100_future'")))
    with pytest.raises(StoreError, match="0100_future is newer than this alignd"):
        await Store.open(store_url)
