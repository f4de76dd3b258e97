"""Hot-swap benchmark: under continuous chat load on a real `alignd serve`, the time from a promote (or rollback)
call to the first response written by the new version, and the requests that failed during the swaps.

Goals (issue "Embedded RLHF trainer"): first response by the new version within 1 s; 0 failed requests; 20 swaps,
then 20 rollbacks. The server runs with --max-loras 2, so it keeps only the promoted adapter loaded and every swap
is a cold one (adapter read, checked and loaded into vLLM, then routed); --max-loras 4 shows warm swaps.

    .venv/bin/python bench/hotswap.py [--swaps 20] [--concurrency 4] [--max-loras 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from bench.harness import ADMIN_KEY, demo_model, run_benchmark, running_alignd
from bench.load import RequestResult, closed_loop, percentile, post_chat

PROMPTS = ["Tell me about comets.", "How do I bake bread?", "Any tips for tomatoes?", "What is a guitar chord?"]


class ChatLoad:
    """Clients sending short chat requests back to back from a background thread, until stopped."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url, self.concurrency = url, concurrency
        self.results: list[RequestResult] = []
        """Every answer so far, in the order they came (the swaps watch it)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        rng = random.Random(0)
        async with httpx.AsyncClient(timeout=60) as client:
            await closed_loop(self.concurrency, lambda _: post_chat(client, f"{self.url}/v1/chat/completions", {
                "model": "alignd", "max_tokens": 16, "temperature": 1.0,
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}),
                keep_going=lambda _: not self._stop.is_set(), results=self.results)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


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


def swap(admin: httpx.Client, load: ChatLoad, call: str, body: dict | None) -> tuple[int, float, float | None]:
    """Make one promote/rollback call; return (new version, call ms, ms to the first response by it)."""
    started = time.perf_counter()
    r = admin.post(call, json=body) if body is not None else admin.post(call)
    r.raise_for_status()
    called = time.perf_counter()
    version = r.json()["version"]
    target = f"policy-{version}"
    deadline = called + 10
    while time.perf_counter() < deadline:
        firsts = [a.finished_at for a in list(load.results) if a.finished_at >= started and a.fingerprint == target]
        if firsts:
            return version, (called - started) * 1000, (min(firsts) - started) * 1000
        time.sleep(0.005)
    return version, (called - started) * 1000, None


def summarize(name: str, rows: list[tuple[int, float, float | None]]) -> None:
    firsts = [r[2] for r in rows if r[2] is not None]
    calls = [r[1] for r in rows]
    missing = sum(r[2] is None for r in rows)
    print(f"{name}: {len(rows)} swaps; call p50 {percentile(calls, 50):.0f} ms, max {max(calls):.0f} ms; "
          f"first response by the new version p50 {percentile(firsts, 50):.0f} ms, "
          f"p90 {percentile(firsts, 90):.0f} ms, max {max(firsts):.0f} ms"
          + (f"; {missing} with no response by the new version within 10 s" if missing else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()

    model = args.model or demo_model()
    data_dir = Path(tempfile.mkdtemp(prefix="alignd-bench-hotswap-"))
    flags = ["--training-trigger", "manual", "--max-loras", str(args.max_loras), "--gate-margin", "-100",
             "--kl-budget", "1000", "--trainer-threads", "1",
             "--reward-model-confidence", "0"]  # swaps, not learning: any candidate will do
    with (running_alignd(model, data_dir, flags) as server,
          httpx.Client(base_url=server.spec.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       timeout=120) as admin):
        make_versions(server.spec.base_url, admin, 2)
        load = ChatLoad(server.spec.base_url, args.concurrency)
        load.start()
        time.sleep(3)
        promotes, rollbacks = [], []
        for i in range(args.swaps):
            promotes.append(swap(admin, load, f"/v1/policies/{1 + i % 2}/promote", None))
            time.sleep(1.5)
        for _ in range(args.swaps):
            rollbacks.append(swap(admin, load, "/v1/policies/rollback", {}))
            time.sleep(1.5)
        load.stop()
    failed = sum(not a.ok for a in load.results)
    print(f"\nmax_loras {args.max_loras}, {args.concurrency} clients, {len(load.results)} chat requests during the "
          f"swaps, {failed} failed")
    summarize("promote", promotes)
    summarize("rollback", rollbacks)
    print("\nper swap (version, call ms, first response ms):")
    for kind, rows in (("promote", promotes), ("rollback", rollbacks)):
        print(f"  {kind}: " + ", ".join(f"v{v} {c:.0f}/{f:.0f}" if f is not None else f"v{v} {c:.0f}/-"
                                        for v, c, f in rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_benchmark(main))
