"""Hot-swap benchmark: under continuous chat load on a real `alignd serve`, the time from a promote (or rollback)
call to the first response written by the new version, and the requests that failed during the swaps.

Goals (issue "Embedded RLHF trainer"): first response by the new version within 1 s; 0 failed requests; 20 swaps,
then 20 rollbacks. The server runs with --max-loras 2, so it keeps only the promoted adapter loaded and every swap
is a cold one (adapter read, checked and loaded into vLLM, then routed); --max-loras 4 shows warm swaps.

    .venv/bin/python bench/hotswap.py [--swaps 20] [--concurrency 4] [--max-loras 2]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.alignment import ADMIN, free_port, start_server  # noqa: E402

PROMPTS = ["Tell me about comets.", "How do I bake bread?", "Any tips for tomatoes?", "What is a guitar chord?"]


class Load(threading.Thread):
    """One client sending short chat requests back to back, recording (sent, received, status, fingerprint)."""

    def __init__(self, url: str, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.rng = url, stop, random.Random(seed)
        self.records: list[tuple[float, float, int, str | None]] = []

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json={
                        "model": "alignd", "max_tokens": 16, "temperature": 1.0,
                        "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}]})
                    fingerprint = r.json().get("system_fingerprint") if r.status_code == 200 else None
                    self.records.append((sent, time.monotonic(), r.status_code, fingerprint))
                except httpx.HTTPError:
                    self.records.append((sent, time.monotonic(), 0, None))


def make_versions(url: str, admin: httpx.Client, count: int) -> None:
    """Feedback, then `count` quick training runs whose candidates stay unpromoted."""
    with httpx.Client(timeout=120) as client:
        for i in range(24):
            r = client.post(f"{url}/v1/chat/completions", json={
                "model": "alignd", "n": 2, "temperature": 1.0, "max_tokens": 32,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}]}).json()
            client.post(f"{url}/v1/feedback", json={"completion_id": r["id"], "kind": "pairwise",
                                                     "winner": i % 2}).raise_for_status()
    for _ in range(count):
        run = admin.post("/v1/training/runs", json={"iterations": 1, "promote": False}).json()
        while (run := admin.get(f"/v1/training/runs/{run['id']}").json())["status"] == "running":
            time.sleep(1)
        if run["status"] != "succeeded":
            raise SystemExit(f"training run failed: {run['error']}")
        print(f"  version {run['candidate']} registered by {run['id']}", flush=True)


def swap(admin: httpx.Client, loads: list[Load], call: str, body: dict | None) -> tuple[int, float, float | None]:
    """Make one promote/rollback call; return (new version, call ms, ms to the first response by it)."""
    started = time.monotonic()
    r = admin.post(call, json=body) if body is not None else admin.post(call)
    r.raise_for_status()
    called = time.monotonic()
    version = r.json()["version"]
    target = f"policy-{version}"
    deadline = called + 10
    while time.monotonic() < deadline:
        firsts = [rec[1] for load in loads for rec in list(load.records) if rec[1] >= started and rec[3] == target]
        if firsts:
            return version, (called - started) * 1000, (min(firsts) - started) * 1000
        time.sleep(0.005)
    return version, (called - started) * 1000, None


def summarize(name: str, rows: list[tuple[int, float, float | None]]) -> None:
    firsts = [r[2] for r in rows if r[2] is not None]
    calls = [r[1] for r in rows]
    missing = sum(r[2] is None for r in rows)
    print(f"{name}: {len(rows)} swaps; call p50 {statistics.median(calls):.0f} ms, max {max(calls):.0f} ms; "
          f"first response by the new version p50 {statistics.median(firsts):.0f} ms, "
          f"p90 {sorted(firsts)[int(0.9 * (len(firsts) - 1))]:.0f} ms, max {max(firsts):.0f} ms"
          + (f"; {missing} with no response by the new version within 10 s" if missing else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    from alignd.demo.build import ensure_demo_model

    model = args.model or ensure_demo_model(ROOT / ".alignd-test-cache")
    data_dir = Path(tempfile.mkdtemp(prefix="alignd-bench-hotswap-"))
    port = free_port()
    proc = start_server(model, data_dir, port, ["--training-trigger", "manual", "--max-loras", str(args.max_loras),
                                                "--gate-margin", "-100", "--kl-budget", "1000",
                                                "--trainer-threads", "1"], data_dir / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120) as admin:
            make_versions(url, admin, 2)
            stop = threading.Event()
            loads = [Load(url, stop, seed) for seed in range(args.concurrency)]
            for load in loads:
                load.start()
            time.sleep(3)
            promotes, rollbacks = [], []
            for i in range(args.swaps):
                promotes.append(swap(admin, loads, f"/v1/policies/{1 + i % 2}/promote", None))
                time.sleep(1.5)
            for _ in range(args.swaps):
                rollbacks.append(swap(admin, loads, "/v1/policies/rollback", {}))
                time.sleep(1.5)
            stop.set()
            for load in loads:
                load.join(60)
        records = [rec for load in loads for rec in load.records]
        failed = sum(rec[2] != 200 for rec in records)
        print(f"\nmax_loras {args.max_loras}, {args.concurrency} clients, {len(records)} chat requests during the "
              f"swaps, {failed} failed")
        summarize("promote", promotes)
        summarize("rollback", rollbacks)
        print("\nper swap (version, call ms, first response ms):")
        for kind, rows in (("promote", promotes), ("rollback", rollbacks)):
            print(f"  {kind}: " + ", ".join(f"v{v} {c:.0f}/{f:.0f}" if f is not None else f"v{v} {c:.0f}/-"
                                            for v, c, f in rows))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
