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
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from alignd.store import ChoiceRecord, CompletionRecord, Store
from bench.harness import (
    ROOT,
    CpuCounters,
    ServerProcess,
    ServerSpec,
    add_database_flags,
    free_port,
    run_benchmark,
    throwaway_databases,
)
from bench.load import RawHTTPClient, RequestResult, TextTable, closed_loop, percentile

COMPLETIONS = 2000
WARMUP_S = 2.0
MIXES = {
    "thumbs": [("thumbs", 1.0)],
    # Roughly what a chat UI sends: mostly thumbs, some ratings and side-by-side choices, a few edits.
    "mixed": [("thumbs", 0.7), ("rating", 0.15), ("pairwise", 0.1), ("edit", 0.05)],
}
TABLE = TextTable([("backend", -12), ("events/s", 10), ("p50 ms", 9), ("p99 ms", 9), ("max ms", 9), ("errors", 8),
                   ("201s (all)", 12), ("stored", 8), ("server CPU/event", 18), ("others, cores", 15)])


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


def feedback_server(url: str, data_dir: str) -> ServerSpec:
    """This script's ``--serve`` process: the real app on the database at ``url``."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.feedback", "--serve", url, "--port", str(port), "--data-dir", data_dir]
    return ServerSpec("feedback server", argv, {}, "/health", port, ROOT)


async def load(server: ServerProcess, completion_ids: list[str], *, concurrency: int, seconds: float,
               mix: list[tuple[str, float]]) -> tuple[list[RequestResult], list[RequestResult], float, CpuCounters]:
    """A closed loop: a warm-up, then ``seconds`` measured; every answer, those that came in the window, its length
    and the CPU time used in it."""
    rng = random.Random(0)
    client = RawHTTPClient("127.0.0.1", server.spec.port)
    stop = False

    async def post(index: int) -> RequestResult:
        payload = body(rng, completion_ids, mix)
        started = time.perf_counter()
        status = await client.post("/v1/feedback", payload)
        return RequestResult(status == 201, started, time.perf_counter() - started)

    running = asyncio.create_task(closed_loop(concurrency, post, keep_going=lambda _: not stop))
    try:
        await asyncio.sleep(WARMUP_S)
        began, before = time.perf_counter(), server.cpu_counters()
        await asyncio.sleep(seconds)
        ended = time.perf_counter()
        cpu = server.cpu_counters() - before
        stop = True
        answers = await running
    finally:
        client.close()
    return answers, [r for r in answers if began <= r.finished_at < ended], ended - began, cpu


async def run(backend: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="alignd-bench-") as tmp:
        async with throwaway_databases(backend, args.postgres_url) as new_database:
            url = await new_database()
            completion_ids = await seed(url)
            with ServerProcess(feedback_server(url, tmp), Path(tmp) / "server.log", stop_timeout_s=30.0,
                               announce_stop=False) as server:
                await asyncio.to_thread(server.wait_ready, 30.0, poll_s=0.1)
                answers, measured, elapsed, cpu = await load(
                    server, completion_ids, concurrency=args.concurrency, seconds=args.seconds, mix=MIXES[args.mix])
            stored = await stored_events(url)
    ok = sum(r.ok for r in measured)
    return Result(backend, elapsed, ok, len(measured) - ok, [r.latency_s for r in measured],
                  sum(r.ok for r in answers), stored, cpu.server_s, cpu.background_s / elapsed)


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


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_flags(parser)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mix", choices=sorted(MIXES), default="mixed")
    args = parser.parse_args()

    print(f"POST /v1/feedback, {args.concurrency} connections, {args.seconds:.0f} s after {WARMUP_S:.0f} s warm-up, "
          f"mix {args.mix}, {COMPLETIONS} completions, {os.cpu_count()} CPUs")
    print(TABLE.header())
    for backend in args.backends.split(","):
        r = await run(backend, args)
        print(TABLE.row(backend, f"{r.rate:,.0f}", f"{percentile(r.latencies, 50) * 1000:.1f}",
                        f"{percentile(r.latencies, 99) * 1000:.1f}", f"{max(r.latencies) * 1000:.1f}", str(r.errors),
                        str(r.acked), str(r.stored), f"{r.server_cpu_s / max(1, r.ok + r.errors) * 1e6:.0f} µs",
                        f"{r.other_cores:.2f}"))
        assert r.stored == r.acked, "every acknowledged event, and only those, must be stored"
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:
        cli = argparse.ArgumentParser()
        cli.add_argument("--serve")
        cli.add_argument("--port", type=int)
        cli.add_argument("--data-dir")
        a = cli.parse_args()
        serve_main(a.serve, a.port, a.data_dir)
    else:
        # No subreaper: its server has no engine processes, and the PostgreSQL pg_ctl leaves must not be adopted.
        sys.exit(run_benchmark(lambda: asyncio.run(main()), adopt_orphans=False))
