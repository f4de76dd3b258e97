"""Feedback ingestion: sustained ``POST /v1/feedback`` throughput and latency at a fixed concurrency.

    python -m bench.feedback [--backends sqlite,postgresql] [--concurrency 32] [--seconds 10] [--mix mixed]
                             [--postgres-url URL]

For each backend: a fresh database is seeded with completions (2 choices each, written through the store), then
the real app (``create_app``: default plugins, group-commit store, no engine needed) is served by uvicorn in its own
process, and a closed-loop load of ``--concurrency`` keep-alive HTTP/1.1 connections posts feedback against random
completions for ``--seconds`` (after a warm-up). Every 201 means the event was committed; at the end the number of
stored events is checked against the number of 201s. The load generator speaks raw HTTP over asyncio streams so
that it takes as little of the machine's CPU as possible from the server.

SQLite runs in a temporary file (WAL, synchronous=NORMAL). PostgreSQL uses ``--postgres-url`` /
``ALIGND_BENCH_POSTGRES_URL`` (a user allowed to CREATE DATABASE), else a throwaway cluster with default (durable,
fsync on) settings from ``tests/pgserver.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from alignd.store import ChoiceRecord, CompletionRecord, Store

COMPLETIONS = 2000
WARMUP_S = 2.0
MIXES = {
    "thumbs": [("thumbs", 1.0)],
    # Roughly what a chat UI sends: mostly thumbs, some ratings and side-by-side choices, a few edits.
    "mixed": [("thumbs", 0.7), ("rating", 0.15), ("pairwise", 0.1), ("edit", 0.05)],
}


@dataclass
class Result:
    backend: str
    seconds: float
    ok: int
    errors: int
    latencies: list[float]
    acked: int
    """Every 201 of the run, warm-up included."""
    stored: int
    server_cpu_s: float
    """CPU time the server process used during the measured window (all its threads)."""
    other_cores: float
    """Cores that other processes (not the server, not this load generator) kept busy meanwhile."""

    @property
    def rate(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=1000)[int(q * 1000) - 1] * 1000


def body(rng: random.Random, completion_ids: list[str], mix: list[tuple[str, float]]) -> bytes:
    kind = rng.choices([k for k, _ in mix], [w for _, w in mix])[0]
    doc: dict[str, object] = {"completion_id": rng.choice(completion_ids), "kind": kind,
                              "user": f"bench-user-{rng.randrange(500)}"}
    if kind == "thumbs":
        doc |= {"choice": rng.randrange(2), "value": rng.choice(["up", "down"])}
    elif kind == "rating":
        doc |= {"choice": rng.randrange(2), "score": rng.randint(1, 10)}
    elif kind == "pairwise":
        doc |= {"winner": rng.choice([0, 1, "tie"])}
    else:
        doc |= {"text": f"A better answer, take {rng.randrange(10**6)}."}
    return json.dumps(doc).encode()


async def seed(url: str) -> list[str]:
    run = uuid.uuid4().hex[:8]
    records = [CompletionRecord(
        id=f"chatcmpl-{run}-{n}", created=datetime.now(UTC), model="alignd", policy_version=0,
        messages=[{"role": "user", "content": f"Tell me something about the number {n}."}], params={"n": 2},
        user=f"user-{n % 50}", metadata=None, prompt_tokens=16, completion_tokens=64, latency_ms=100.0, stream=False,
        choices=[ChoiceRecord(index=i, text=f"answer {i} about {n} " * 6, token_ids=list(range(32)),
                              finish_reason="stop") for i in range(2)]) for n in range(COMPLETIONS)]
    async with await Store.open(url) as store:
        await asyncio.gather(*(store.record_completion(r) for r in records))
    return [r.id for r in records]


async def stored_events(url: str) -> int:
    async with await Store.open(url) as store:
        return (await store.count_feedback())[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time all processes used so far, over every core (Linux /proc/stat; idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(server_pid: int) -> tuple[float, float, float]:
    return cpu_seconds(server_pid), cpu_seconds(os.getpid()), busy_seconds()


@asynccontextmanager
async def serve(url: str, data_dir: str) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.feedback", "--serve", url, "--port",
                                                str(port), "--data-dir", data_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                try:
                    if (await client.get(f"{base}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.returncode is None, "the server exited during start"
                await asyncio.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def load(port: int, completion_ids: list[str], *, concurrency: int, seconds: float,
               mix: list[tuple[str, float]], server_pid: int
               ) -> tuple[int, int, list[float], float, int, tuple[float, float, float]]:
    """Closed loop: each connection sends its next request when the previous answer is in."""
    measuring = False
    stop = False
    ok = errors = acked = 0
    latencies: list[float] = []

    async def connection(seed: int) -> None:
        nonlocal ok, errors, acked
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop:
                payload = body(rng, completion_ids, mix)
                request = (b"POST /v1/feedback HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(payload)) + payload
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                acked += status == 201
                if measuring:
                    latencies.append(time.perf_counter() - started)
                    if status == 201:
                        ok += 1
                    else:
                        errors += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection(i)) for i in range(concurrency)]
    await asyncio.sleep(WARMUP_S)
    measuring, began, before = True, time.perf_counter(), cpu_snapshot(server_pid)
    await asyncio.sleep(seconds)
    measuring, elapsed = False, time.perf_counter() - began
    after = cpu_snapshot(server_pid)
    cpu = (after[0] - before[0], after[1] - before[1], after[2] - before[2])
    stop = True
    await asyncio.gather(*tasks)
    return ok, errors, latencies, elapsed, acked, cpu


@asynccontextmanager
async def database(backend: str, postgres_url: str | None, tmp: str) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    server = None
    if postgres_url is None:
        from tests.pgserver import start_postgres

        server = start_postgres()  # default settings: fsync on, like production
        postgres_url = server.url
    name = f"alignd_bench_{uuid.uuid4().hex[:8]}"
    admin = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
        if server is not None:
            server.stop()


async def run(backend: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="alignd-bench-") as tmp:
        async with database(backend, args.postgres_url, tmp) as url:
            completion_ids = await seed(url)
            async with serve(url, tmp) as (base, pid):
                port = int(base.rsplit(":", 1)[1])
                ok, errors, latencies, elapsed, acked, cpu = await load(
                    port, completion_ids, concurrency=args.concurrency, seconds=args.seconds, mix=MIXES[args.mix],
                    server_pid=pid)
            stored = await stored_events(url)
    server_cpu, load_cpu, busy = cpu
    return Result(backend, elapsed, ok, errors, latencies, acked, stored, server_cpu,
                  max(0.0, busy - server_cpu - load_cpu) / elapsed)


def serve_main(url: str, port: int, data_dir: str) -> None:
    """The server process: the real app on ``url``, without an engine (feedback does not need one)."""
    import uvicorn

    from alignd.app import create_app
    from alignd.config import load_settings

    class NoEngine:
        loaded_versions: dict[int, object] = {0: None}  # noqa: RUF012
        max_model_len = 512

    settings = load_settings({"model": "none", "data_dir": data_dir, "store": {"database": url}}, environ={})
    uvicorn.run(create_app(settings, engine=NoEngine()), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mix", choices=sorted(MIXES), default="mixed")
    parser.add_argument("--postgres-url", default=os.environ.get("ALIGND_BENCH_POSTGRES_URL"))
    args = parser.parse_args()

    print(f"POST /v1/feedback, {args.concurrency} connections, {args.seconds:.0f} s after {WARMUP_S:.0f} s warm-up, "
          f"mix {args.mix}, {COMPLETIONS} completions, {os.cpu_count()} CPUs")
    print(f"{'backend':<12}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
          f"{'201s (all)':>12}{'stored':>8}{'server CPU/event':>18}{'others, cores':>15}")
    for backend in args.backends.split(","):
        r = await run(backend, args)
        print(f"{backend:<12}{r.rate:>10,.0f}{r.percentile(0.5):>9.1f}{r.percentile(0.99):>9.1f}"
              f"{max(r.latencies) * 1000:>9.1f}{r.errors:>8}{r.acked:>12}{r.stored:>8}"
              f"{r.server_cpu_s / max(1, r.ok + r.errors) * 1e6:>15.0f} µs{r.other_cores:>15.2f}")
        assert r.stored == r.acked, "every acknowledged event, and only those, must be stored"


if __name__ == "__main__":
    if "--serve" in sys.argv:
        cli = argparse.ArgumentParser()
        cli.add_argument("--serve")
        cli.add_argument("--port", type=int)
        cli.add_argument("--data-dir")
        a = cli.parse_args()
        serve_main(a.serve, a.port, a.data_dir)
    else:
        asyncio.run(main())
