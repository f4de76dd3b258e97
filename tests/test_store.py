"""The store on SQLite and PostgreSQL: every test that takes ``store_url`` runs on both."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import make_url

from alignd.store import (
    HEAD,
    ChoiceRecord,
    CompletionRecord,
    RecordRejectedError,
    Store,
    StoreClosedError,
    StoreError,
)
from tests.store_reads import count_completions, get_completion

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


async def schema_revision(store: Store) -> str | None:
    """The database's Alembic revision, read through the store's engine (the server never asks)."""
    async with store.engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


def make_record(n: int, **overrides: Any) -> CompletionRecord:
    """A plausible completion with two choices; ``overrides`` replace fields."""
    fields: dict[str, Any] = {
        "id": f"chatcmpl-{n:06d}",
        "created": T0 + timedelta(seconds=n),
        "model": "alignd",
        "policy_version": n % 3,
        "messages": [{"role": "user", "content": f"question {n}"}],
        "params": {"temperature": 0.7, "n": 2, "max_tokens": 64},
        "user": f"user-{n % 5}",
        "metadata": {"session": n},
        "prompt_tokens": 10 + n,
        "completion_tokens": 7,
        "latency_ms": 12.5,
        "stream": n % 2 == 0,
        "choices": [
            ChoiceRecord(index=0, text=f"answer {n}", token_ids=[1, 2, n], finish_reason="stop"),
            ChoiceRecord(index=1, text=f"other answer {n}", token_ids=[3, n], finish_reason="length"),
        ],
    }
    fields.update(overrides)
    return CompletionRecord(**fields)


async def _create_database(server_url: str) -> tuple[str, str]:
    """CREATE a fresh database on the server; return (its name, its URL)."""
    name = f"alignd_test_{uuid.uuid4().hex[:12]}"
    admin_dsn = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def _drop_database(server_url: str, name: str) -> None:
    admin_dsn = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of an empty database: a new SQLite file, or a newly created PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'alignd.db'}"  # absolute path: sqlite:////tmp/…
        return
    server_url: str = request.getfixturevalue("postgres_server_url")
    name, url = await _create_database(server_url)
    try:
        yield url
    finally:
        await _drop_database(server_url, name)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = await Store.open(store_url)
    try:
        yield s
    finally:
        await s.close()


# ---------------------------------------------------------------- reads and writes


async def test_round_trip(store: Store) -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    full = make_record(
        1,
        created=datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=ist),
        model="alignd@3",
        messages=[
            {"role": "system", "content": "Sé breve. 简洁。"},
            {"role": "user", "content": "emoji 🎉 and quotes \"'\\ and newline\n"},
        ],
        params={"temperature": 0.0, "top_p": 1.0, "stop": ["\n\n"], "seed": 7, "n": 3},
        user="ünïcode-user",
        metadata={"nested": {"list": [1, 2.5, None, True, "☃"]}, "empty": {}},
        latency_ms=1234.5678,
        choices=[
            ChoiceRecord(index=0, text="Ça va ☃ — 你好", token_ids=[0, 1, 2**31 - 1], finish_reason="stop"),
            ChoiceRecord(index=1, text="", token_ids=[], finish_reason=None),
            ChoiceRecord(index=2, text="🎉" * 100, token_ids=list(range(1000)), finish_reason="length"),
        ],
    )
    sparse = make_record(2, user=None, metadata=None, choices=[])
    await store.record_completion(full)
    await store.record_completion(sparse)

    got = await get_completion(store, full.id)
    assert got == full
    assert got is not None and got.created.tzinfo == UTC  # returned in UTC, same instant
    assert got.created == datetime(2025, 6, 1, 6, 30, 0, 123456, tzinfo=UTC)
    got_sparse = await get_completion(store, sparse.id)
    assert got_sparse == sparse
    assert got_sparse is not None and got_sparse.metadata is None and got_sparse.user is None
    assert await get_completion(store, "chatcmpl-missing") is None

    async with store.engine.connect() as conn:  # None metadata is SQL NULL, not JSON 'null'
        nulls = (await conn.execute(text("SELECT count(*) FROM completions WHERE metadata IS NULL"))).scalar_one()
    assert nulls == 1


async def test_naive_created_is_rejected(store: Store) -> None:
    with pytest.raises(RecordRejectedError):
        await store.record_completion(make_record(1, created=datetime(2025, 1, 1)))
    assert await count_completions(store) == 0


# ---------------------------------------------------------------- group commit


async def test_group_commit_batches_concurrent_writes(store: Store) -> None:
    records = [make_record(n) for n in range(500)]
    await asyncio.gather(*(store.record_completion(r) for r in records))

    assert await count_completions(store) == 500
    assert store.stats.records == 500
    assert store.stats.failed == 0
    assert store.stats.batches < store.stats.records  # several records shared a transaction
    assert 1 < store.stats.largest_batch <= 256
    assert await get_completion(store, records[321].id) == records[321]


async def test_bad_record_fails_only_its_own_caller(store: Store) -> None:
    await store.record_completion(make_record(999, model="original"))
    batch = [make_record(n) for n in range(20)]
    batch.insert(7, make_record(999, model="impostor"))  # id already committed
    batch.append(make_record(5, model="twin"))  # duplicate of a record in the same batch
    batches_before = store.stats.batches

    results = await asyncio.gather(*(store.record_completion(r) for r in batch), return_exceptions=True)

    failed = {i for i, r in enumerate(results) if isinstance(r, BaseException)}
    assert failed == {7, len(batch) - 1}
    assert all(isinstance(results[i], RecordRejectedError) for i in failed)
    assert "chatcmpl-000999" in str(results[7])
    assert await count_completions(store) == 21
    original = await get_completion(store, "chatcmpl-000999")
    assert original is not None and original.model == "original"
    twin = await get_completion(store, "chatcmpl-000005")
    assert twin is not None and twin.model == "alignd"  # the first of the two won
    assert store.stats.failed == 2
    # The whole batch went to the writer together, failed, and was retried record by record.
    assert store.stats.batches - batches_before == 20


async def test_backpressure_bounds_batches(store_url: str) -> None:
    async with await Store.open(store_url, batch_max=4, queue_max=8) as store:
        await asyncio.gather(*(store.record_completion(make_record(n)) for n in range(100)))
        assert await count_completions(store) == 100
        assert store.stats.largest_batch <= 4
        assert store.stats.batches >= 25


async def test_close_drains_everything_enqueued(store_url: str) -> None:
    store = await Store.open(store_url, batch_max=16, queue_max=1000)
    tasks = [asyncio.create_task(store.record_completion(make_record(n))) for n in range(300)]
    await asyncio.sleep(0)  # every task enqueues its record and waits for the commit
    await store.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    assert store.stats.records == 300
    await store.close()  # idempotent

    async with await Store.open(store_url) as reopened:
        assert await count_completions(reopened) == 300


async def test_close_refuses_callers_still_waiting_for_room(store_url: str) -> None:
    store = await Store.open(store_url, batch_max=2, queue_max=4)
    tasks = [asyncio.create_task(store.record_completion(make_record(n))) for n in range(20)]
    await asyncio.sleep(0)
    await store.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(r is None for r in results) == 4  # the ones that were enqueued
    assert all(isinstance(r, StoreClosedError) for r in results if r is not None)
    with pytest.raises(StoreClosedError):
        await store.record_completion(make_record(100))
    with pytest.raises(StoreClosedError):
        await store.list_feedback()


async def test_data_survives_close_and_reopen(store_url: str) -> None:
    rec = make_record(42, metadata={"k": ["v", 1]})
    async with await Store.open(store_url) as store:
        await store.record_completion(rec)
    async with await Store.open(store_url) as store:
        assert await get_completion(store, rec.id) == rec
        assert await count_completions(store) == 1


# ---------------------------------------------------------------- backends and URLs


async def test_sqlite_uses_wal_and_connection_pragmas(tmp_path: Path) -> None:
    async with await Store.open(f"sqlite:///{tmp_path}/wal.db") as store:
        await store.record_completion(make_record(1))
        async with store.engine.connect() as conn:
            pragmas = {
                name: (await conn.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    assert pragmas == {"journal_mode": "wal", "synchronous": 1, "foreign_keys": 1, "busy_timeout": 30_000}


async def test_sqlite_relative_url_creates_parent_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with await Store.open("sqlite:///nested/dir/alignd.db") as store:
        assert await schema_revision(store) == HEAD
    assert (tmp_path / "nested" / "dir" / "alignd.db").is_file()
    async with await Store.open(f"sqlite+aiosqlite:///{tmp_path}/nested/dir/alignd.db") as store:
        assert await schema_revision(store) == HEAD


async def test_open_errors_name_the_url_without_password() -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError) as info:
        await Store.open(f"postgresql://bob:s3cret-pw@127.0.0.1:{port}/alignd", connect_timeout=5)
    message = str(info.value)
    assert f"127.0.0.1:{port}/alignd" in message and "bob" in message
    assert "s3cret-pw" not in message

    with pytest.raises(StoreError, match="unsupported database URL") as info:
        await Store.open("mysql://bob:s3cret-pw@localhost/alignd")
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(StoreError, match="invalid database URL"):
        await Store.open("not a url")


async def test_postgres_scheme_aliases(postgres_server_url: str) -> None:
    name, url = await _create_database(postgres_server_url)
    try:
        for scheme in ("postgres", "postgresql+asyncpg"):
            aliased = make_url(url).set(drivername=scheme).render_as_string(hide_password=False)
            async with await Store.open(aliased) as store:
                assert await schema_revision(store) == HEAD
                assert "***" in store.url and make_url(url).password not in store.url
    finally:
        await _drop_database(postgres_server_url, name)
