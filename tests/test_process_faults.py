"""``alignd serve`` as real processes, crashed and stopped on one data dir, in order (each test starts from where the
previous one left the data dir; one engine start per server process, four in all):

1. SIGKILL during a promotion (``ALIGND_FAILPOINT``, :mod:`alignd.faults`), once with the adapter loaded but the
   database not yet written, once with the database written but requests not yet routed: each restart serves the
   version the database says, ``/ready`` and chat agree;
2. SIGKILL of the server while its trainer process runs: the trainer, and the engine's processes, exit within
   seconds;
3. a corrupt promoted adapter at start: ``/ready`` is 503 ``policy_unavailable`` with the reason until an operator
   rolls back;
4. SIGTERM with a stream and a training run in flight: ``/ready`` is 503 at once, the stream finishes, the run is
   stopped and marked failed, the process exits 0 with no traceback nor nanobind leak report in its output.

Every feedback event acknowledged (201) before a fault is stored after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from alignd.demo.corpus import training_prompts
from alignd.faults import FAILPOINT_ENV
from alignd.store import Store
from tests.test_serve_process import _free_port

ADMIN, API = "admin-secret", "frontend-secret"
ENV = {"ALIGND_KV_CACHE_SPACE_GIB": "1", "ALIGND_MAX_MODEL_LEN": "512", "ALIGND_MAX_NUM_SEQS": "64",
       "ALIGND_ADMIN_KEY": ADMIN, "ALIGND_API_KEY": API, "ALIGND_CHAT_REQUESTS_PER_MINUTE": "0",
       # Tiny runs that always pass the gate and promote at once: these tests are about the machinery.
       "ALIGND_TRAINING_TRIGGER": "manual", "ALIGND_PPO_ITERATIONS": "1", "ALIGND_ROLLOUT_BATCH_SIZE": "8",
       "ALIGND_MAX_NEW_TOKENS": "24", "ALIGND_GATE_MARGIN": "-100", "ALIGND_KL_BUDGET": "1000",
       "ALIGND_TRAINER_THREADS": "1", "ALIGND_REWARD_MODEL_CONFIDENCE": "0", "ALIGND_CANARY_SHARE": "0",
       "ALIGND_SHUTDOWN_GRACE_S": "60"}


class Serve:
    """One ``alignd serve`` process on the shared data dir; its output goes to a log file."""

    def __init__(self, model: Path, data_dir: Path, log: Path, failpoint: str | None = None) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, **ENV}
        env.pop(FAILPOINT_ENV, None)
        if failpoint:
            env[FAILPOINT_ENV] = failpoint
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "alignd.cli", "serve", "--model", str(model),
                                          "--data-dir", str(data_dir), "--port", str(port)],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.seen: set[psutil.Process] = set()
        """Every process of its tree seen so far (the engine's, the trainer's, the reaper)."""

    def request(self, method: str, path: str, key: str = ADMIN, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"},
                             timeout=kw.pop("timeout", 120), **kw)

    def probe(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.url}/ready", timeout=5)
        except httpx.TransportError:
            return None

    def wait_started(self, timeout: float = 300) -> httpx.Response:
        """The first /ready answer that is not "starting"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"alignd serve exited during start:\n{self.output()[-3000:]}"
            ready = self.probe()
            if ready is not None and ready.json()["status"] != "starting":
                self.children()
                return ready
            time.sleep(0.25)
        raise AssertionError(f"not started after {timeout} s")

    def chat_version(self) -> str:
        body = {"model": "alignd", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        r = self.request("POST", "/v1/chat/completions", key=API, json=body)
        assert r.status_code == 200, r.text
        return r.json()["system_fingerprint"]

    def run(self, timeout: float = 600) -> dict[str, Any]:
        """Start a training run; its row. A server SIGKILLed before this one (an earlier test, same database) may
        still hold the trainer lease: it lapses within its 30 s, and the start is refused with 409 until then."""
        deadline = time.monotonic() + 45
        while True:
            r = self.request("POST", "/v1/training/runs")
            if r.status_code != 409 or "trainer lease" not in r.text or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert r.status_code == 202, r.text
        return r.json()

    def run_row(self, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/training/runs/{run_id}").json()

    def children(self) -> set[psutil.Process]:
        try:
            children = set(psutil.Process(self.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return set()
        self.seen |= children
        return children

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """Whatever of its tree is still alive (a failed test's)."""
        self.children()
        if self.proc.poll() is None:
            self.proc.kill()
        for p in self.seen:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)


def _gone(processes: set[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    """The processes still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def world(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The shared data dir, the feedback ids acknowledged so far, the servers started (killed at the end)."""
    state: dict[str, Any] = {"data_dir": tmp_path_factory.mktemp("faults-data"), "acked": set(), "servers": [],
                             "logs": tmp_path_factory.mktemp("faults-logs")}

    def start(failpoint: str | None = None) -> Serve:
        n = len(state["servers"])
        server = Serve(demo_model_dir, state["data_dir"], state["logs"] / f"serve-{n}.log", failpoint)
        state["servers"].append(server)
        return server

    state["start"] = start
    yield state
    for server in state["servers"]:
        server.kill()


def give_feedback(srv: Serve, acked: set[str], n_prompts: int = 8) -> None:
    for i, prompt in enumerate(training_prompts(n_prompts, seed=5)):
        body = {"model": "alignd", "messages": [{"role": "user", "content": prompt.text}], "n": 2, "max_tokens": 16,
                "temperature": 1.0, "user": f"user-{i % 3}"}
        completion = srv.request("POST", "/v1/chat/completions", key=API, json=body)
        assert completion.status_code == 200, completion.text
        fb = srv.request("POST", "/v1/feedback", key=API, json={"completion_id": completion.json()["id"],
                                                                "kind": "pairwise", "winner": i % 2})
        assert fb.status_code == 201, fb.text
        acked.add(fb.json()["id"])


def stored_feedback(srv: Serve) -> set[str]:
    page = srv.request("GET", "/v1/feedback?limit=1000").json()
    assert not page["has_more"]
    return {event["id"] for event in page["data"]}


def consistent_version(srv: Serve) -> int:
    """The version /ready, the registry and chat all name (asserting that they agree)."""
    ready = srv.probe()
    assert ready is not None and ready.status_code == 200, ready.text if ready is not None else "no answer"
    policies = srv.request("GET", "/v1/policies").json()
    version = policies["promoted"]
    assert ready.json()["policy_version"] == version
    assert srv.chat_version() == f"policy-{version}"
    promoted = [p["version"] for p in policies["data"] if p["status"] == "promoted"]
    assert promoted == [version]
    return version


def test_a_server_killed_during_a_promotion_restarts_on_a_consistent_version(world: dict[str, Any]) -> None:
    # Killed with the candidate's adapter loaded in the engine, before the database names it promoted.
    first = world["start"]("promote:loaded")
    assert first.wait_started().status_code == 200
    give_feedback(first, world["acked"])
    run = first.run()
    assert first.proc.wait(600) == -signal.SIGKILL, first.output()[-3000:]
    assert _gone(first.seen) == [], "the engine's processes outlived their server"

    second = world["start"]("promote:written")
    assert second.wait_started().status_code == 200
    assert consistent_version(second) == 0
    assert second.request("GET", "/v1/policies/1").json()["status"] == "candidate"  # registered, not promoted
    orphan = second.run_row(run["id"])
    assert orphan["status"] == "failed" and "server stopped" in orphan["error"]
    assert stored_feedback(second) >= world["acked"]

    # Killed with the database written, before requests were routed to the new version.
    with pytest.raises(httpx.TransportError):
        second.request("POST", "/v1/policies/1/promote")
    assert second.proc.wait(60) == -signal.SIGKILL

    third = world["start"]()
    assert third.wait_started().status_code == 200
    assert consistent_version(third) == 1
    assert stored_feedback(third) >= world["acked"]
    world["serving"] = third


def test_a_server_killed_with_sigkill_takes_its_trainer_along(world: dict[str, Any]) -> None:
    srv: Serve = world["serving"]
    give_feedback(srv, world["acked"], n_prompts=4)
    before = srv.children()
    run = srv.run()
    deadline = time.monotonic() + 300
    while srv.run_row(run["id"])["phase"] in ("starting", "data"):  # the trainer has loaded torch and the data
        assert time.monotonic() < deadline
        time.sleep(0.5)
    trainer = srv.children() - before
    assert trainer, "the run's trainer process"
    srv.proc.send_signal(signal.SIGKILL)
    assert srv.proc.wait(30) == -signal.SIGKILL
    assert _gone(trainer) == [], "the trainer outlived its server"
    assert _gone(srv.seen) == [], "the engine's processes outlived their server"
    world["orphan_run"] = run["id"]


def test_a_corrupt_promoted_adapter_keeps_the_server_not_ready_with_the_reason(world: dict[str, Any]) -> None:
    weights = world["data_dir"] / "policies" / "1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)
    srv = world["start"]()
    ready = srv.wait_started()
    assert ready.status_code == 503 and ready.json()["status"] == "policy_unavailable"
    assert "version 1" in ready.json()["detail"] and "SHA-256" in ready.json()["detail"]
    assert srv.probe().status_code == 503  # it stays so: nothing falls back silently
    assert srv.chat_version() == "policy-0"  # the base answers, and says so
    refused = srv.request("POST", "/v1/training/runs")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "policy_unavailable"
    orphan = srv.run_row(world["orphan_run"])
    assert orphan["status"] == "failed" and "server stopped" in orphan["error"]
    assert stored_feedback(srv) >= world["acked"]
    # The operator's fix: roll back to a version that loads. Ready again.
    assert srv.request("POST", "/v1/policies/rollback", json={"version": 0}).status_code == 200
    assert consistent_version(srv) == 0
    world["serving"] = srv


def test_sigterm_drains_streams_stops_the_run_and_exits_cleanly(world: dict[str, Any]) -> None:
    srv: Serve = world["serving"]
    before = srv.children()
    run = srv.run()
    deadline = time.monotonic() + 300
    while srv.run_row(run["id"])["phase"] == "starting":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    trainer = srv.children() - before
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "alignd", "messages": [{"role": "user", "content": "Tell me about stars."}],
                "stream": True, "max_tokens": 400, "ignore_eos": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {API}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(120)
    srv.proc.send_signal(signal.SIGTERM)
    # Not ready from the first probe on, while the stream is still being served.
    ready = srv.probe()
    assert ready is not None and ready.status_code == 503 and ready.json()["status"] == "stopping"
    reader.join(300)
    assert srv.proc.wait(120) == 0
    assert events[-1] == "[DONE]", "the in-flight stream must finish after SIGTERM"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert _gone(trainer) == [] and _gone(before) == [], "nothing is left behind"
    output = srv.output()
    for noise in ("Traceback", "EngineDeadError", "nanobind"):
        assert noise not in output, f"{noise!r} in the output:\n{output[-5000:]}"
    shutdown = output[output.index("SIGTERM: not ready"):]  # (before it, the corrupt adapter's start logged an ERROR)
    assert "ERROR" not in shutdown and "CRITICAL" not in shutdown, shutdown

    async def read() -> tuple[Any, set[str]]:
        store = await Store.open(f"sqlite:///{world['data_dir'] / 'alignd.db'}")
        try:
            return await store.get_run(run["id"]), {e.id for e in await store.list_feedback(limit=1000)}
        finally:
            await store.close()

    row, events_stored = asyncio.run(read())
    assert row.status == "failed" and "server stopped" in (row.error or "")
    assert events_stored >= world["acked"]
