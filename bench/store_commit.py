"""Group commit vs one transaction per record: completions/s of concurrent ``record_completion`` calls.

    python -m bench.store_commit [--records 2000] [--backends sqlite,postgresql] [--postgres-url URL]

SQLite runs in a temporary file (WAL, synchronous=NORMAL). PostgreSQL uses ``--postgres-url`` /
``ALIGND_BENCH_POSTGRES_URL`` (a user allowed to CREATE DATABASE), or else starts a throwaway
cluster with default (durable) settings via ``tests/pgserver.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from alignd.store import ChoiceRecord, CompletionRecord, Store

GROUP_BATCH_MAX = 256


def make_record(n: int, run: str) -> CompletionRecord:
    """A completion shaped like a typical chat turn (two choices of ~60 tokens)."""
    return CompletionRecord(
        id=f"chatcmpl-{run}-{n}",
        created=datetime.now(UTC),
        model="alignd",
        policy_version=1,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Tell me something interesting about the number {n}."},
        ],
        params={"temperature": 0.8, "top_p": 0.95, "max_tokens": 128, "n": 2},
        user=f"user-{n % 50}",
        metadata={"client": "bench"},
        prompt_tokens=32,
        completion_tokens=120,
        latency_ms=250.0,
        stream=False,
        choices=[
            ChoiceRecord(index=i, text=f"answer {i} about {n} " * 8, token_ids=list(range(60)), finish_reason="stop")
            for i in range(2)
        ],
    )


async def measure(url: str, *, batch_max: int, records: int) -> tuple[float, int]:
    """Records/s for ``records`` concurrent calls, and the number of transactions the writer used."""
    run = uuid.uuid4().hex[:8]
    async with await Store.open(url, batch_max=batch_max) as store:
        await asyncio.gather(*(store.record_completion(make_record(-i - 1, run)) for i in range(20)))  # warm up
        batches_before = store.stats.batches
        start = time.perf_counter()
        await asyncio.gather(*(store.record_completion(make_record(n, run)) for n in range(records)))
        elapsed = time.perf_counter() - start
        return records / elapsed, store.stats.batches - batches_before


@asynccontextmanager
async def sqlite_database() -> AsyncIterator[Callable[[], str]]:
    with tempfile.TemporaryDirectory(prefix="alignd-bench-") as tmp:
        yield lambda: f"sqlite:///{Path(tmp) / uuid.uuid4().hex}.db"


@asynccontextmanager
async def postgres_database(server_url: str | None) -> AsyncIterator[Callable[[], str]]:
    import asyncpg
    from sqlalchemy.engine import make_url

    server = None
    if server_url is None:
        from tests.pgserver import start_postgres

        server = start_postgres()  # default settings: fsync on, like production
        server_url = server.url
    admin_dsn = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    created: list[str] = []

    async def new_database() -> str:
        name = f"alignd_bench_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return make_url(server_url).set(database=name).render_as_string(hide_password=False)

    try:
        urls = [await new_database() for _ in range(2)]  # one per configuration
        yield urls.pop
    finally:
        try:
            if created:
                conn = await asyncpg.connect(admin_dsn)
                try:
                    for name in created:
                        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await conn.close()
        finally:
            if server is not None:
                server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default=os.environ.get("ALIGND_BENCH_POSTGRES_URL"))
    args = parser.parse_args()

    print(f"{args.records} concurrent record_completion calls, 2 choices each")
    print(f"{'backend':<12}{'mode':<26}{'records/s':>12}{'transactions':>14}")
    for backend in args.backends.split(","):
        databases = sqlite_database() if backend == "sqlite" else postgres_database(args.postgres_url)
        async with databases as next_url:
            grouped, grouped_tx = await measure(next_url(), batch_max=GROUP_BATCH_MAX, records=args.records)
            single, single_tx = await measure(next_url(), batch_max=1, records=args.records)
        print(f"{backend:<12}{f'group commit (≤{GROUP_BATCH_MAX})':<26}{grouped:>12,.0f}{grouped_tx:>14}")
        print(f"{backend:<12}{'one per record':<26}{single:>12,.0f}{single_tx:>14}")
        print(f"{backend:<12}{'ratio':<26}{grouped / single:>11.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
