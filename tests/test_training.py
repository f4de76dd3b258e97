"""End to end on the real server and engine: feedback → training run in its own process → gate → promotion →
the new version answers; rollback; a rejected candidate; a corrupt adapter refused; a killed trainer; a restart.

Budgets are tiny (two PPO iterations of eight rollouts): these tests check the machinery, not learning, which
``tests/test_trainer_ppo.py`` and ``bench/alignment.py`` cover.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from alignd.app import create_app
from alignd.demo.corpus import classify, training_prompts
from alignd.store import RunRow
from tests.engine_fixtures import create_pg_database
from tests.engine_fixtures import test_settings as settings_for
from tests.serverkit import AppServer, LoopThread
from tests.store_reads import get_completion

ADMIN, USER = "admin-secret", "user-secret"
TRAINER = {"training_trigger": "manual", "ppo_iterations": 2, "rollout_batch_size": 8, "max_new_tokens": 24,
           "gate_margin": -100.0, "kl_budget": 1000.0, "trainer_threads": 1,
           "reward_model_confidence": 0.0,  # machinery, not learning: a handful of pairs proves no reward model
           "canary_share": 0.0}  # a passing candidate is promoted at once (the live test: tests/test_canary.py)


def admin(srv: AppServer, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{srv.url}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, **kw)


def chat(srv: AppServer, content: str, **kw: Any) -> httpx.Response:
    body = {"model": "alignd", "messages": [{"role": "user", "content": content}], "max_tokens": 24, **kw}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {USER}"},
                      timeout=60)


def give_feedback(srv: AppServer, n_prompts: int = 16) -> None:
    """Chat with two replies per prompt and prefer the more "friendly" one (the corpus classifier decides)."""
    for prompt in training_prompts(n_prompts, seed=3):
        r = chat(srv, prompt.text, n=2, temperature=1.0)
        assert r.status_code == 200, r.text
        body = r.json()
        styles = [classify(c["message"]["content"]).style for c in body["choices"]]
        winner = 1 if styles[1] == "friendly" and styles[0] != "friendly" else 0
        fb = httpx.post(f"{srv.url}/v1/feedback", json={"completion_id": body["id"], "kind": "pairwise",
                                                        "winner": winner},
                        headers={"Authorization": f"Bearer {USER}"}, timeout=30)
        assert fb.status_code == 201, fb.text


def wait_run(srv: AppServer, run_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = admin(srv, "GET", f"/v1/training/runs/{run_id}").json()
        if run["status"] != "running":
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


class Traffic:
    """Chat requests in a loop from a thread, recording every status and fingerprint."""

    def __init__(self, srv: AppServer) -> None:
        self.srv = srv
        self.results: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = chat(self.srv, "Tell me about comets.", max_tokens=8)
            self.results.append((r.status_code, r.json().get("system_fingerprint")))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture(scope="module")
def app_factory(engine_loop: LoopThread, engine: Any, demo_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., AppServer]]:
    """``start(data_dir)``: an app with keys and the manual trainer on the shared engine; stopped at the end. No chat
    rate limit: ``Traffic`` chats back to back from one key for as long as a run lasts, which on a fast machine is
    more than the default 600 requests a minute (these tests are about training, not limits)."""
    servers: list[AppServer] = []

    def start(data_dir: Path, database: str | None = None, **trainer: Any) -> AppServer:
        settings = settings_for(demo_model_dir, data_dir, api_keys=[USER], admin_keys=[ADMIN],
                                trainer={**TRAINER, **trainer}, database=database, store={"policy_sync_s": 0.5},
                                chat_requests_per_minute=0)
        srv = AppServer(engine_loop, create_app(settings, engine=engine)).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        if not srv.server.should_exit:
            srv.stop()


@pytest.fixture(scope="module")
def trained(app_factory: Callable[..., AppServer], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A server that has collected feedback and run one training run, with chat traffic during the run."""
    data_dir = tmp_path_factory.mktemp("trained")
    srv = app_factory(data_dir)
    refused = admin(srv, "POST", "/v1/training/runs")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_training_data"
    give_feedback(srv)
    with Traffic(srv) as traffic:
        started = admin(srv, "POST", "/v1/training/runs", json={"iterations": 2})
        assert started.status_code == 202, started.text
        run = started.json()
        second = admin(srv, "POST", "/v1/training/runs")
        assert second.status_code == 409 and run["id"] in second.json()["error"]["message"]
        finished = wait_run(srv, run["id"])
        after_swap = [chat(srv, "Any tips on comets?", max_tokens=8) for _ in range(3)]
    return {"srv": srv, "data_dir": data_dir, "run": finished, "traffic": traffic.results, "after": after_swap}


def test_a_run_trains_gates_and_promotes_without_failed_requests(trained: dict[str, Any]) -> None:
    run, srv = trained["run"], trained["srv"]
    assert run["status"] == "succeeded", run["error"]
    assert run["phase"] == "done" and run["progress"] == 1.0
    assert run["candidate"] == 1 and run["promoted"] is True and run["parent"] == 0
    metrics = run["metrics"]
    assert metrics["data"]["new_pairs"] > 0
    assert len(metrics["ppo"]) == 2
    for key in ("reward", "kl", "entropy", "approx_kl", "clip_fraction", "explained_variance", "tokens_per_s"):
        assert key in metrics["ppo"][-1]
    assert "heldout_accuracy" in metrics["reward_model"]
    assert metrics["gate"]["promote"] is True
    # Traffic during the run and the swap: nothing failed; it moved from version 0 to version 1.
    statuses = [s for s, _ in trained["traffic"]]
    assert statuses and all(s == 200 for s in statuses)
    assert all(r.status_code == 200 and r.json()["system_fingerprint"] == "policy-1" for r in trained["after"])
    # The store names the version that generated it.
    stored = srv.loop.run(get_completion(srv.state.store, trained["after"][0].json()["id"]))
    assert stored.policy_version == 1
    # The registry: a manifest and safetensors only; the base retired.
    policies = admin(srv, "GET", "/v1/policies").json()
    assert policies["promoted"] == 1
    by_version = {p["version"]: p for p in policies["data"]}
    assert by_version[1]["status"] == "promoted" and by_version[0]["status"] == "retired"
    folder = trained["data_dir"] / "policies" / "1"
    assert (folder / "manifest.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    # The pairs it consumed are marked: nothing new is left to train on.
    assert srv.loop.run(srv.state.store.count_unused_signal()) == (0, 0)
    # Training figures reach /metrics.
    text = httpx.get(f"{srv.url}/metrics", headers={"authorization": f"Bearer {USER}"}).text
    assert 'alignd_training_runs_total{status="succeeded"} 1.0' in text
    assert "alignd_promoted_policy_version 1.0" in text


def test_a_reward_model_no_better_than_chance_stops_the_run_before_ppo(
        app_factory: Callable[..., AppServer], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Coin-flip preferences teach nothing: with the check on, the run stops after the reward model with the reason,
    registers nothing, and the next run continues from the reward model it saved."""
    srv = app_factory(tmp_path_factory.mktemp("chance"), reward_model_confidence=0.95)
    for n, prompt in enumerate(training_prompts(24, seed=9)):
        body = chat(srv, prompt.text, n=2, temperature=1.0).json()
        fb = httpx.post(f"{srv.url}/v1/feedback", json={"completion_id": body["id"], "kind": "pairwise",
                                                        "winner": n % 2}, headers={"Authorization": f"Bearer {USER}"})
        assert fb.status_code == 201, fb.text
    first = wait_run(srv, admin(srv, "POST", "/v1/training/runs").json()["id"])
    assert first["status"] == "failed" and first["candidate"] is None, first
    assert "reward model" in first["error"] and ("chance" in first["error"] or "no held-out" in first["error"])
    assert "ppo" not in first["metrics"]
    figures = first["metrics"]["reward_model"]
    if figures["heldout_interval"] is not None:  # some completions were held out: the interval includes 0.5
        assert figures["heldout_interval"][0] <= 0.5 <= figures["heldout_interval"][1]
    assert figures["warm_start"] is None
    second = wait_run(srv, admin(srv, "POST", "/v1/training/runs").json()["id"])
    assert second["metrics"]["reward_model"]["warm_start"].endswith(f"{first['id']}/reward")
    assert admin(srv, "GET", "/v1/policies").json()["promoted"] == 0  # nothing was registered or promoted


def test_rollback_and_promote_take_effect_for_new_requests(trained: dict[str, Any]) -> None:
    srv = trained["srv"]
    with Traffic(srv) as traffic:
        back = admin(srv, "POST", "/v1/policies/rollback")
        assert back.status_code == 200 and back.json()["version"] == 0
        assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-0"
        again = admin(srv, "POST", "/v1/policies/1/promote")
        assert again.status_code == 200 and again.json()["status"] == "promoted"
        assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-1"
        to_base = admin(srv, "POST", "/v1/policies/rollback", json={"version": 0})
        assert to_base.json()["version"] == 0
        assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-0"
    assert traffic.results and all(s == 200 for s, _ in traffic.results)
    assert admin(srv, "POST", "/v1/policies/99/promote").status_code == 404
    bad = admin(srv, "POST", "/v1/policies/rollback", json={"version": "one"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "version"
    assert admin(srv, "POST", "/v1/policies/1/promote").status_code == 200  # leave version 1 serving


def test_admin_endpoints_refuse_non_admin_keys(trained: dict[str, Any]) -> None:
    srv = trained["srv"]
    for method, path in (("GET", "/v1/policies"), ("POST", "/v1/policies/0/promote"),
                         ("POST", "/v1/policies/rollback"), ("GET", "/v1/training/runs"),
                         ("POST", "/v1/training/runs"), ("GET", f"/v1/training/runs/{trained['run']['id']}")):
        as_user = httpx.request(method, f"{srv.url}{path}", headers={"Authorization": f"Bearer {USER}"})
        assert as_user.status_code == 403 and as_user.json()["error"]["type"] == "permission_error", path
        anonymous = httpx.request(method, f"{srv.url}{path}")
        assert anonymous.status_code == 401, path
    assert admin(srv, "GET", "/v1/policies").json()["promoted"] == 1  # nothing changed


def test_a_rejected_candidate_is_kept_and_a_corrupt_adapter_is_refused(trained: dict[str, Any]) -> None:
    srv = trained["srv"]
    give_feedback(srv, n_prompts=6)
    # A run whose gate cannot be passed: its candidate is kept as rejected, with its figures and the reason. It runs
    # RLOO (any objective goes through the same gate and registry): the run names its objective and its figures.
    original = srv.state.trainer.config
    srv.state.trainer.config = _with_margin(original, 100.0)
    try:
        run = admin(srv, "POST", "/v1/training/runs", json={"iterations": 1, "objective": "rloo"})
        assert run.status_code == 202, run.text
        assert run.json()["config"]["objective"] == "rloo"
        rejected = wait_run(srv, run.json()["id"])
    finally:
        srv.state.trainer.config = original
    assert rejected["status"] == "succeeded" and rejected["promoted"] is False, rejected["error"]
    assert rejected["metrics"]["objective"] == "rloo" and rejected["metrics"]["kl_controller"]["kl_coef"] is None
    [iteration] = rejected["metrics"]["ppo"]
    assert iteration["objective"] == "rloo" and iteration["samples_per_prompt"] == 4
    assert iteration["value_loss"] is None and isinstance(iteration["kl"], float)
    assert rejected["parent"] == 1 and rejected["candidate"] == 2
    policy = admin(srv, "GET", "/v1/policies/2").json()
    assert policy["status"] == "rejected" and "not above the margin" in policy["reason"]
    assert policy["parent"] == 1 and policy["loaded"] is False and "reward" in policy["metrics"]
    assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-1"
    # Corrupt its weights: promoting it is refused, and version 1 keeps serving.
    weights = trained["data_dir"] / "policies" / "2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)
    refused = admin(srv, "POST", "/v1/policies/2/promote")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "policy_load_failed"
    assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-1"
    assert admin(srv, "GET", "/v1/policies").json()["promoted"] == 1


def test_an_unknown_objective_is_refused_before_anything_starts(trained: dict[str, Any]) -> None:
    srv = trained["srv"]
    before = admin(srv, "GET", "/v1/training/runs").json()["data"]
    refused = admin(srv, "POST", "/v1/training/runs", json={"objective": "dpo"})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "objective" and "'dpo'" in error["message"]
    assert admin(srv, "GET", "/v1/training/runs").json()["data"] == before
    assert srv.state.trainer.current is None


def _with_margin(config: Callable[..., Any], margin: float) -> Callable[..., Any]:
    def patched(request: Any) -> Any:
        c = config(request)
        c.gate.margin = margin
        return c

    return patched


def test_a_killed_trainer_fails_the_run_and_serving_goes_on(trained: dict[str, Any]) -> None:
    srv = trained["srv"]
    give_feedback(srv, n_prompts=6)
    run_id = admin(srv, "POST", "/v1/training/runs").json()["id"]
    deadline = time.monotonic() + 120
    while admin(srv, "GET", f"/v1/training/runs/{run_id}").json()["phase"] in ("starting", "data"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(srv.state.trainer.current.process.pid, signal.SIGKILL)
    with Traffic(srv) as traffic:
        run = wait_run(srv, run_id)
    assert run["status"] == "failed" and "killed by signal 9" in run["error"]
    assert traffic.results and all(s == 200 for s, _ in traffic.results)
    assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-1"
    # Its signal was not consumed: the next run can still use it.
    assert srv.loop.run(srv.state.store.count_unused_signal())[0] > 0


def test_alignd_train_starts_a_run_and_follows_it(trained: dict[str, Any]) -> None:
    srv = trained["srv"]
    give_feedback(srv, n_prompts=6)
    done = subprocess.run([sys.executable, "-m", "alignd.cli", "train", "--url", srv.url, "--admin-key", ADMIN,
                           "--iterations", "1", "--no-promote", "--objective", "rloo"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout and "candidate: version" in done.stdout and "(promoted)" not in done.stdout
    # The progress lines (one per change, the run is not on a terminal): from the start to "100% done". Which
    # phases show in between depends on the 1 s poll, so the test does not name them.
    bars = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(bars) >= 2 and "0% starting" in bars[0] and "100% done" in bars[-1]
    [latest, *_] = admin(srv, "GET", "/v1/training/runs?limit=1").json()["data"]
    assert latest["status"] == "succeeded" and latest["promoted"] is False
    assert latest["config"]["objective"] == latest["metrics"]["objective"] == "rloo"
    assert admin(srv, "GET", f"/v1/policies/{latest['candidate']}").json()["status"] == "candidate"
    assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-1"
    refused = subprocess.run([sys.executable, "-m", "alignd.cli", "train", "--url", srv.url, "--admin-key", "nope"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "admin key" in refused.stderr.lower()


def test_enough_new_feedback_starts_a_run_by_itself(app_factory: Callable[..., AppServer],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = app_factory(tmp_path_factory.mktemp("auto"), training_trigger="auto", min_new_pairs=8,
                      min_new_labels=10_000, min_interval_s=0)
    give_feedback(srv, n_prompts=4)
    time.sleep(6)  # longer than the trigger's poll: 4 pairs are not enough
    assert admin(srv, "GET", "/v1/training/runs").json()["data"] == []
    give_feedback(srv, n_prompts=6)
    deadline = time.monotonic() + 60
    while not (runs := admin(srv, "GET", "/v1/training/runs").json()["data"]):
        assert time.monotonic() < deadline, "no automatic run started"
        time.sleep(0.5)
    assert runs[0]["trigger"] == "auto"
    finished = wait_run(srv, runs[0]["id"])
    assert finished["status"] == "succeeded", finished["error"]
    assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-1"
    srv.stop()


def test_a_restart_serves_the_promoted_version_and_fails_orphaned_runs(
        trained: dict[str, Any], app_factory: Callable[..., AppServer]) -> None:
    srv = trained["srv"]
    promoted = admin(srv, "GET", "/v1/policies").json()["promoted"]
    orphan = RunRow(id="run-orphan", status="running", phase="ppo", progress=0.5, trigger="auto", parent=0,
                    candidate=None, promoted=False, config={}, metrics={}, error=None,
                    created=datetime.now(UTC), finished=None)
    srv.loop.run(srv.state.store.insert_run(orphan))
    srv.stop()
    restarted = app_factory(trained["data_dir"])
    assert chat(restarted, "Hello").json()["system_fingerprint"] == f"policy-{promoted}"
    run = admin(restarted, "GET", "/v1/training/runs/run-orphan").json()
    assert run["status"] == "failed" and "server stopped" in run["error"]
    listed = admin(restarted, "GET", "/v1/training/runs").json()["data"]
    assert {r["id"] for r in listed} >= {"run-orphan", trained["run"]["id"]}


def test_a_run_past_its_time_limit_is_stopped_and_a_run_can_be_cancelled(
        app_factory: Callable[..., AppServer], tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = app_factory(tmp_path_factory.mktemp("limits"), run_timeout_s=2)
    give_feedback(srv, n_prompts=4)
    timed_out = wait_run(srv, admin(srv, "POST", "/v1/training/runs").json()["id"], timeout=120)
    assert timed_out["status"] == "failed" and "time limit of 2 s" in timed_out["error"]
    srv.state.trainer.run_timeout_s = 600  # the supervisor is free again: the next run starts and can be cancelled
    started = admin(srv, "POST", "/v1/training/runs")
    assert started.status_code == 202, started.text
    process = srv.state.trainer.current.process
    cancelled = admin(srv, "POST", f"/v1/training/runs/{started.json()['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"] == "cancelled by an operator" and not process.is_alive()
    again = admin(srv, "POST", f"/v1/training/runs/{started.json()['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_not_running"
    assert chat(srv, "Hello").status_code == 200
    srv.stop()


def test_replicas_on_one_postgresql_follow_each_others_promotions(
        app_factory: Callable[..., AppServer], tmp_path_factory: pytest.TempPathFactory,
        postgres_server_url: str) -> None:
    database = create_pg_database(postgres_server_url, f"replicas_{uuid.uuid4().hex[:8]}")
    first = app_factory(tmp_path_factory.mktemp("replica-a"), database=database)
    second = app_factory(tmp_path_factory.mktemp("replica-b"), database=database)
    give_feedback(first, n_prompts=8)
    run = wait_run(first, admin(first, "POST", "/v1/training/runs", json={"iterations": 1}).json()["id"])
    assert run["status"] == "succeeded" and run["promoted"] is True, run["error"]
    assert admin(second, "GET", "/v1/training/runs").json()["data"][0]["id"] == run["id"]  # one database

    def served(srv: AppServer) -> str | None:
        # Both apps share the test session's one engine, so one's eviction can unload the version the other still
        # routes to until it follows (a 404 meanwhile); real replicas each have their own engine.
        return chat(srv, "Hello").json().get("system_fingerprint")

    def settles(srv: AppServer, fingerprint: str) -> bool:
        deadline = time.monotonic() + 30
        while served(srv) != fingerprint:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    assert settles(second, "policy-1"), "the second replica did not follow the promotion"
    assert admin(second, "POST", "/v1/policies/rollback").json()["version"] == 0
    assert settles(first, "policy-0"), "the first replica did not follow the rollback"
    assert served(second) == "policy-0"
    first.stop()
    second.stop()
