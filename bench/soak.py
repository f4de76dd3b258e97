"""Soak benchmark: a fresh `alignd serve` on the demo model (real engine, SQLite file in a temporary folder) under a
steady load for a bounded time, on the loopback interface only:

* chat at --chat-rate requests a second (n=2 choices, a share of them streamed), open loop: a request is sent on
  schedule whatever the server's latency, up to --max-in-flight at once;
* feedback on every acknowledged completion (pairwise, thumbs or a rating in turn);
* an operator: once --train-after-s have passed, a training run through the API (small budget, not auto-promoted),
  its candidate promoted through the API, later a rollback, and again while time is left (--runs at most);
* the server's resident memory (its own process, and with the engine's processes) every --sample-s seconds.

It prints requests and errors by status, latency percentiles, resident memory at the start and end with a linear
fit's slope (MB/min: growth shows as a trend, not as one figure), what the server acknowledged against what its
SQLite file holds (completions and feedback events), and writes them as JSON with --out.

    .venv/bin/python bench/soak.py                       # 10 minutes at 1 chat/s, the figures of docs/benchmarks.md
    .venv/bin/python bench/soak.py --duration 45 --out /tmp/soak.json

Run it alone: other CPU-heavy jobs on a 2-core machine distort the latency figures (not the counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from alignd.clients.simulate import prompt_pool
from bench.harness import ADMIN_KEY, ServerProcess, demo_model, machine_info, run_benchmark, running_alignd

# The trainer's budget per run: small, so that a run (and its promotion) fits in a soak on two cores.
# The reward model's chance check is off: a soak exercises the machinery, a few minutes of feedback teach little.
TRAINER_FLAGS = ["--training-trigger", "manual", "--ppo-iterations", "2", "--rollout-batch-size", "8",
                 "--gate-samples-per-prompt", "1", "--reward-model-confidence", "0", "--trainer-threads", "1",
                 "--max-loras", "4"]
KINDS = ("pairwise", "thumbs", "rating")


@dataclass
class Tally:
    """What the load saw: per operation, latencies and statuses; what the server acknowledged."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    completions: set[str] = field(default_factory=set)  # acknowledged: a 200 (a stream: its [DONE])
    feedback: set[str] = field(default_factory=set)  # acknowledged: a 201
    operator: list[dict[str, Any]] = field(default_factory=list)

    def record(self, op: str, status: str, seconds: float) -> None:
        self.latencies.setdefault(op, []).append(seconds)
        self.statuses.setdefault(op, Counter())[status] += 1

    def summary(self) -> dict[str, Any]:
        ops = {}
        for op, lat in sorted(self.latencies.items()):
            ops[op] = {"requests": len(lat), "statuses": dict(sorted(self.statuses[op].items())),
                       "p50_ms": round(percentile(lat, 50) * 1000, 1), "p99_ms": round(percentile(lat, 99) * 1000, 1),
                       "max_ms": round(max(lat) * 1000, 1)}
        return ops


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else 0.0


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return 0.0 if var == 0 else 60 * sum((t - mean_t) * (m - mean_m) for t, m in samples) / var


def rss_mb(pid: int, serving: set[int]) -> tuple[float, float, float]:
    """Resident memory in MB of the server process; of it with the processes in ``serving`` (its descendants at the
    start: vLLM's engine core and workers); and of its other descendants (a training run's process, while one
    trains). ``serving`` is filled on the first call."""
    root = psutil.Process(pid)
    own = root.memory_info().rss
    children = root.children(recursive=True)
    if not serving:
        serving.update(c.pid for c in children)
    tree, other = own, 0
    for child in children:
        try:
            rss = child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        if child.pid in serving:
            tree += rss
        else:
            other += rss
    return own / 2**20, tree / 2**20, other / 2**20


async def one_chat(http: httpx.AsyncClient, tally: Tally, prompt: str, index: int, args: argparse.Namespace) -> None:
    """A chat request (every --stream-every'th streamed), then feedback on what it returned."""
    stream = args.stream_every > 0 and index % args.stream_every == 0
    body = {"model": "alignd", "messages": [{"role": "user", "content": prompt}], "n": 2, "temperature": 1.0,
            "max_tokens": args.max_tokens, "stream": stream, "user": f"soak-user-{index % 50}"}
    op = "chat (stream)" if stream else "chat"
    started = time.perf_counter()
    completion_id, texts = None, ["", ""]
    try:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                status = str(r.status_code)
                if r.status_code == 200:
                    done = False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                status = "stream error"
                                continue
                            completion_id = chunk["id"]
                            for c in chunk["choices"]:
                                texts[c["index"]] += c["delta"].get("content") or ""
                    if not done:
                        status, completion_id = "stream cut", None
                else:
                    await r.aread()
        else:
            r = await http.post("/v1/chat/completions", json=body)
            status = str(r.status_code)
            if r.status_code == 200:
                data = r.json()
                completion_id = data["id"]
                texts = [c["message"]["content"] for c in data["choices"]]
    except httpx.HTTPError as e:
        status = type(e).__name__
    tally.record(op, status, time.perf_counter() - started)
    if completion_id is None:
        return
    tally.completions.add(completion_id)
    kind = KINDS[index % len(KINDS)]
    # Prefer the shorter reply: a consistent, learnable signal.
    better = 0 if len(texts[0]) <= len(texts[1]) else 1
    payload: dict[str, Any] = {"pairwise": {"winner": better},
                               "thumbs": {"value": "up" if better == 0 else "down", "choice": 0},
                               "rating": {"score": 8 if better == 0 else 3, "choice": 0}}[kind]
    started = time.perf_counter()
    try:
        r = await http.post("/v1/feedback", json={"completion_id": completion_id, "kind": kind,
                                                  "user": body["user"], **payload})
        status = str(r.status_code)
        if r.status_code == 201:
            tally.feedback.add(r.json()["id"])
    except httpx.HTTPError as e:
        status = type(e).__name__
    tally.record("feedback", status, time.perf_counter() - started)


async def load(http: httpx.AsyncClient, tally: Tally, args: argparse.Namespace, deadline: float) -> int:
    """Open-loop chat at ``args.chat_rate`` until ``deadline``; the requests skipped because --max-in-flight were
    already running (counted, never queued: a queue would hide the server's slowness from the schedule)."""
    prompts = [p.text for p in prompt_pool("training")]
    interval, index, skipped = 1 / args.chat_rate, 0, 0
    running: set[asyncio.Task[None]] = set()
    next_at = time.monotonic()
    while next_at < deadline:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if len(running) >= args.max_in_flight:
            skipped += 1
        else:
            task = asyncio.create_task(one_chat(http, tally, prompts[index % len(prompts)], index, args))
            running.add(task)
            task.add_done_callback(running.discard)
        index += 1
        next_at += interval
    if running:
        await asyncio.wait(running)
    return skipped


async def operator(admin: httpx.AsyncClient, tally: Tally, args: argparse.Namespace, started: float,
                   deadline: float) -> None:
    """Training runs through the API, each candidate promoted through the API and later rolled back."""

    async def call(op: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        t = time.perf_counter()
        try:
            r = await admin.request(method, path, **kw)
        except httpx.HTTPError as e:
            tally.record(op, type(e).__name__, time.perf_counter() - t)
            return None
        tally.record(op, str(r.status_code), time.perf_counter() - t)
        return r

    def note(event: str, **details: Any) -> None:
        entry = {"at_s": round(time.monotonic() - started, 1), "event": event, **details}
        tally.operator.append(entry)
        print(f"  [{entry['at_s']:7.1f} s] {event} {details or ''}", flush=True)

    await asyncio.sleep(max(0.0, started + args.train_after_s - time.monotonic()))
    runs = 0
    while runs < args.runs and time.monotonic() < deadline - 20:
        r = await call("training run", "POST", "/v1/training/runs",
                       json={"iterations": 2, "rollout_batch_size": 8, "promote": False})
        if r is None or r.status_code != 202:
            note("run refused", status=r.status_code if r is not None else None)
            await asyncio.sleep(10)
            continue
        run_id, runs = r.json()["id"], runs + 1
        note("run started", id=run_id)
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            await asyncio.sleep(3)
            got = await call("run status", "GET", f"/v1/training/runs/{run_id}")
            if got is not None and got.status_code == 200 and got.json()["status"] != "running":
                run = got.json()
                break
        note("run ended", status=run.get("status"), candidate=run.get("candidate"), error=run.get("error"))
        if not run.get("candidate") or time.monotonic() > deadline - 10:
            continue
        promoted = await call("promote", "POST", f"/v1/policies/{run['candidate']}/promote")
        note("promoted", version=run["candidate"], status=promoted.status_code if promoted is not None else None)
        # Serve the candidate a while, then roll back to the version before it.
        await asyncio.sleep(min(args.serve_candidate_s, max(0.0, deadline - time.monotonic() - 5)))
        back = await call("rollback", "POST", "/v1/policies/rollback")
        note("rolled back", to=back.json().get("version") if back is not None and back.status_code == 200 else None,
             status=back.status_code if back is not None else None)


async def sampler(pid: int, samples: list[dict[str, float]], started: float, every: float,
                  stop: asyncio.Event) -> None:
    serving: set[int] = set()
    while True:
        own, tree, trainer = rss_mb(pid, serving)
        samples.append({"t_s": round(time.monotonic() - started, 1), "server_mb": round(own, 1),
                        "with_engine_mb": round(tree, 1), "trainer_mb": round(trainer, 1)})
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass


def stored(db: Path) -> dict[str, Any]:
    """The completion and feedback ids the SQLite file holds (read-only, beside the running server)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        completions = {row[0] for row in conn.execute("SELECT id FROM completions")}
        feedback = {row[0] for row in conn.execute("SELECT id FROM feedback")}
    return {"completions": completions, "feedback": feedback}


async def soak(server: ServerProcess, db: Path, args: argparse.Namespace) -> dict[str, Any]:
    tally, samples = Tally(), []
    base = server.spec.base_url
    timeout = httpx.Timeout(120, connect=10)
    limits = httpx.Limits(max_connections=args.max_in_flight * 2 + 4)
    async with (httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as http,
                httpx.AsyncClient(base_url=base, timeout=timeout,
                                  headers={"authorization": f"Bearer {ADMIN_KEY}"}) as admin):
        started = time.monotonic()
        deadline = started + args.duration
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(server.pid, samples, started, args.sample_s, stop))
        operating = asyncio.create_task(operator(admin, tally, args, started, deadline))
        skipped = await load(http, tally, args, deadline)
        elapsed = time.monotonic() - started
        operating.cancel()
        try:
            await operating
        except asyncio.CancelledError:
            pass
        stop.set()
        await sampling
        health = (await http.get("/health")).status_code, (await http.get("/ready")).status_code
        # A run still training is cancelled so that the server stops promptly.
        running = [r["id"] for r in (await admin.get("/v1/training/runs")).json()["data"] if r["status"] == "running"]
        for run_id in running:
            await admin.post(f"/v1/training/runs/{run_id}/cancel")
    rows = stored(db)
    ops = tally.summary()
    all_requests = sum(o["requests"] for o in ops.values())
    errors = Counter({f"{op} {s}": n for op, o in ops.items() for s, n in o["statuses"].items()
                      if not s.startswith("2")})
    server_mb = [(s["t_s"], s["server_mb"]) for s in samples]
    tree_mb = [(s["t_s"], s["with_engine_mb"]) for s in samples]
    return {
        "duration_s": args.duration, "elapsed_s": round(elapsed, 1), "chat_rate": args.chat_rate,
        "max_tokens": args.max_tokens, "stream_every": args.stream_every, "max_in_flight": args.max_in_flight,
        "requests": all_requests, "skipped_in_flight_cap": skipped, "errors": dict(errors),
        "server_errors_5xx": sum(n for key, n in errors.items() if key.rsplit(" ", 1)[-1].startswith("5")),
        "operations": ops,
        "rss": {"server_start_mb": samples[0]["server_mb"], "server_end_mb": samples[-1]["server_mb"],
                "server_slope_mb_per_min": round(slope_per_minute(server_mb), 2),
                "with_engine_start_mb": samples[0]["with_engine_mb"],
                "with_engine_end_mb": samples[-1]["with_engine_mb"],
                "with_engine_slope_mb_per_min": round(slope_per_minute(tree_mb), 2),
                "trainer_peak_mb": max(s["trainer_mb"] for s in samples), "samples": samples},
        "acknowledged": {"completions": len(tally.completions), "feedback": len(tally.feedback)},
        "stored": {"completions": len(rows["completions"]), "feedback": len(rows["feedback"])},
        "acknowledged_missing": {"completions": sorted(tally.completions - rows["completions"]),
                                 "feedback": sorted(tally.feedback - rows["feedback"])},
        "operator": tally.operator, "health_after": {"health": health[0], "ready": health[1]},
    }


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['requests']} requests in {result['elapsed_s']} s "
          f"({result['skipped_in_flight_cap']} chats skipped at the in-flight cap)")
    print(f"{'operation':<16}{'requests':>9}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}  statuses")
    for op, o in result["operations"].items():
        print(f"{op:<16}{o['requests']:>9}{o['p50_ms']:>10}{o['p99_ms']:>10}{o['max_ms']:>10}  {o['statuses']}")
    print(f"errors: {result['errors'] or 'none'}; 5xx: {result['server_errors_5xx']}")
    rss = result["rss"]
    print(f"resident memory, server process: {rss['server_start_mb']:.0f} -> {rss['server_end_mb']:.0f} MB "
          f"(fit {rss['server_slope_mb_per_min']:+.2f} MB/min); with the engine: {rss['with_engine_start_mb']:.0f} -> "
          f"{rss['with_engine_end_mb']:.0f} MB (fit {rss['with_engine_slope_mb_per_min']:+.2f} MB/min); a training "
          f"run's process at most {rss['trainer_peak_mb']:.0f} MB")
    ack, kept = result["acknowledged"], result["stored"]
    print(f"acknowledged / stored: completions {ack['completions']} / {kept['completions']}, "
          f"feedback {ack['feedback']} / {kept['feedback']}; acknowledged but missing: "
          f"{sum(len(v) for v in result['acknowledged_missing'].values())}")
    print(f"after: /health {result['health_after']['health']}, /ready {result['health_after']['ready']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="Seconds of load (default 600).")
    parser.add_argument("--chat-rate", type=float, default=1.0, help="Chat requests a second, on schedule.")
    parser.add_argument("--max-in-flight", type=int, default=8, help="Chat requests running at once at most; a "
                        "scheduled one beyond it is skipped and counted.")
    parser.add_argument("--stream-every", type=int, default=3, help="Every Nth chat is streamed (0: none).")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--train-after-s", type=float, default=None,
                        help="When the first training run starts (default: after a sixth of --duration).")
    parser.add_argument("--runs", type=int, default=2, help="Training runs at most.")
    parser.add_argument("--serve-candidate-s", type=float, default=30,
                        help="How long a promoted candidate serves before the rollback.")
    parser.add_argument("--sample-s", type=float, default=5, help="Seconds between resident-memory samples.")
    parser.add_argument("--model", type=Path, default=None,
                        help="Model folder or .gguf file (default: the demo model cached in .alignd-test-cache).")
    parser.add_argument("--out", type=Path, default=None, help="Write the figures here as JSON.")
    parser.add_argument("server_args", nargs="*", help="Extra `alignd serve` flags, after --.")
    args = parser.parse_args()
    if args.train_after_s is None:
        args.train_after_s = args.duration / 6
    model = args.model or demo_model()
    data_dir = Path(tempfile.mkdtemp(prefix="alignd-bench-soak-"))
    db = data_dir / "soak.db"
    flags = ["--database", f"sqlite:///{db}", *TRAINER_FLAGS, *args.server_args]
    with running_alignd(model, data_dir, flags) as server:
        result = asyncio.run(soak(server, db, args))
    result = {"machine": machine_info(), "model": str(model), "server_flags": flags, **result}
    report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures: {args.out}")
    lost = sum(len(v) for v in result["acknowledged_missing"].values())
    return 1 if lost or result["server_errors_5xx"] else 0


if __name__ == "__main__":
    sys.exit(run_benchmark(main))
