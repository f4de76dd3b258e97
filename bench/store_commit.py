"""Group commit vs one transaction per record: completions/s of concurrent ``record_completion`` calls.

    python -m bench.store_commit [--records 2000] [--backends sqlite,postgresql] [--postgres-url URL]

SQLite runs in a temporary file (WAL, synchronous=NORMAL). PostgreSQL uses ``--postgres-url`` /
``ALIGND_BENCH_POSTGRES_URL`` (a user allowed to CREATE DATABASE), or else starts a throwaway
cluster with default (durable) settings via ``tests/pgserver.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from alignd.store import ChoiceRecord, CompletionRecord, Store
from bench.harness import add_database_flags, throwaway_databases
from bench.load import TextTable

GROUP_BATCH_MAX = 256
TABLE = TextTable([("backend", -12), ("mode", -26), ("records/s", 12), ("transactions", 14)])


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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    add_database_flags(parser)
    args = parser.parse_args()

    print(f"{args.records} concurrent record_completion calls, 2 choices each")
    print(TABLE.header())
    for backend in args.backends.split(","):
        async with throwaway_databases(backend, args.postgres_url) as new_database:
            grouped, grouped_tx = await measure(await new_database(), batch_max=GROUP_BATCH_MAX, records=args.records)
            single, single_tx = await measure(await new_database(), batch_max=1, records=args.records)
        print(TABLE.row(backend, f"group commit (≤{GROUP_BATCH_MAX})", f"{grouped:,.0f}", str(grouped_tx)))
        print(TABLE.row(backend, "one per record", f"{single:,.0f}", str(single_tx)))
        print(TABLE.row(backend, "ratio", f"{grouped / single:.1f}x"))


if __name__ == "__main__":
    asyncio.run(main())
