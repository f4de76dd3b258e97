"""The live A/B test on the real engine: a candidate on canary answers a share of users (sticky per user), simulated
users judge the replies with thumbs, and the always-valid tests promote or reject it by themselves, with no failed
request throughout. Also the operator calls and the bad inputs (OpenAI-shaped 4xx, nothing changed)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import torch
from sqlalchemy import select

from alignd.app import create_app
from alignd.demo.corpus import classify, training_prompts
from alignd.store.tables import completions
from alignd.trainer.config import TrainerConfig
from alignd.trainer.models import POLICY, load_stack
from tests.engine_fixtures import test_settings as settings_for
from tests.serverkit import AppServer, LoopThread
from tests.store_reads import get_completion
from tests.style_adapters import RANKING, fine_tune_towards

ADMIN, USER = "admin-secret", "user-secret"
LIVE = {"training_trigger": "manual", "canary_share": 0.5, "canary_check_s": 0.3, "canary_min_completions": 10,
        "canary_max_latency_ratio": 3.0}


@pytest.fixture(scope="module")
def enthusiastic_adapter(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy adapter of the demo model that writes the "enthusiastic" style far more often than the base."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stack = load_stack(demo_model_dir, TrainerConfig(device="cpu", dtype="float32"))
        fine_tune_towards(stack, RANKING[0], steps=40)
        return stack.save_adapter(POLICY, tmp_path_factory.mktemp("adapter") / "enthusiastic")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def live(engine_loop: LoopThread, engine: Any, demo_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., AppServer]]:
    servers: list[AppServer] = []

    def start(**trainer: Any) -> AppServer:
        settings = settings_for(demo_model_dir, tmp_path_factory.mktemp("canary"), api_keys=[USER],
                                admin_keys=[ADMIN], trainer={**LIVE, **trainer}, chat_requests_per_minute=0)
        srv = AppServer(engine_loop, create_app(settings, engine=engine)).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def admin(srv: AppServer, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{srv.url}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, **kw)


def register(srv: AppServer, adapter: Path, tmp_path: Path) -> int:
    """The adapter as a new candidate version (as a run that passed the gate registers it)."""
    staged = tmp_path / f"staged-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(adapter, staged)
    row = srv.loop.run(srv.state.registry.register(staged, parent=srv.state.router.promoted, run_id="test-canary",
                                                   metrics={}, passed=True, reason="test candidate"))
    return row.version


class Users:
    """Simulated users chatting concurrently under their own ``user`` ids and giving thumbs by a taste."""

    def __init__(self, srv: AppServer, likes: Callable[[str], bool], n_users: int = 40) -> None:
        self.srv, self.likes, self.n_users = srv, likes, n_users
        self.statuses: list[int] = []
        self.seen: dict[str, set[str]] = {}  # user -> fingerprints it got
        self.lock = threading.Lock()
        self.prompts = [p.text for p in training_prompts(64, seed=4)]

    def one(self, i: int) -> str | None:
        who = f"user-{i % self.n_users}"
        body = {"model": "alignd", "messages": [{"role": "user", "content": self.prompts[i % len(self.prompts)]}],
                "max_tokens": 48, "temperature": 1.0, "user": who}
        r = httpx.post(f"{self.srv.url}/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {USER}"})
        with self.lock:
            self.statuses.append(r.status_code)
        if r.status_code != 200:
            return None
        out = r.json()
        with self.lock:
            self.seen.setdefault(who, set()).add(out["system_fingerprint"])
        verdict = "up" if self.likes(out["choices"][0]["message"]["content"]) else "down"
        fb = httpx.post(f"{self.srv.url}/v1/feedback", timeout=60, headers={"Authorization": f"Bearer {USER}"},
                        json={"completion_id": out["id"], "kind": "thumbs", "value": verdict, "user": who})
        with self.lock:
            self.statuses.append(fb.status_code)
        return out["system_fingerprint"]

    def until(self, done: Callable[[], bool], max_events: int = 1200) -> int:
        """Chat and judge, four users at a time, until ``done()``; returns the events sent."""
        sent = 0
        with ThreadPoolExecutor(4) as pool:
            while sent < max_events and not done():
                list(pool.map(self.one, range(sent, sent + 20)))
                sent += 20
        return sent


async def _routed(srv: AppServer, before: datetime) -> dict[str, set[int]]:
    """Each user's policy versions over the completions routed before ``before``."""
    async with srv.state.store.engine.connect() as conn:
        rows = await conn.execute(select(completions.c.user, completions.c.policy_version)
                                  .where(completions.c.created < before))
        out: dict[str, set[int]] = {}
        for who, version in rows:
            out.setdefault(who, set()).add(version)
        return out


def status(srv: AppServer, version: int) -> str:
    return admin(srv, "GET", f"/v1/policies/{version}").json()["status"]


def is_enthusiastic(text: str) -> bool:
    return classify(text).style == RANKING[0]


def test_users_who_prefer_the_canary_get_it_promoted(live: Callable[..., AppServer], enthusiastic_adapter: Path,
                                                     tmp_path: Path) -> None:
    srv = live()
    version = register(srv, enthusiastic_adapter, tmp_path)
    started = admin(srv, "POST", f"/v1/policies/{version}/canary", json={"share": 0.5})
    assert started.status_code == 200 and started.json()["status"] == "canary", started.text
    users = Users(srv, likes=is_enthusiastic)
    sent = users.until(lambda: status(srv, version) != "canary")
    assert status(srv, version) == "promoted", (sent, admin(srv, "GET", f"/v1/policies/{version}/evaluation").json())
    assert set(users.statuses) <= {200, 201}, users.statuses  # no failed request throughout
    # Sticky: each user was routed to one version for the whole experiment (routing happens as a request arrives,
    # which is the completion's ``created``), the users split about evenly at a share of 0.5.
    promoted_at = datetime.fromisoformat(admin(srv, "GET", f"/v1/policies/{version}").json()["promoted_at"])
    routed = srv.loop.run(_routed(srv, promoted_at))
    assert all(len(versions) == 1 for versions in routed.values()), routed
    on_canary = sum(versions == {version} for versions in routed.values())
    assert 0.2 * len(routed) <= on_canary <= 0.8 * len(routed), routed
    evaluation = admin(srv, "GET", f"/v1/policies/{version}/evaluation").json()
    live_figures = evaluation["live"]
    assert live_figures["decision"]["outcome"] == "promoted" and live_figures["decision"]["automatic"]
    canary, promoted = live_figures["canary"], live_figures["promoted"]
    assert canary["good_interval"][0] > promoted["good_interval"][1]  # the sequences separated
    assert live_figures["history"] and canary["requests"] > 0
    after = [users.one(i) for i in range(8)]
    assert after == [f"policy-{version}"] * 8
    metrics = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert f'alignd_canary_feedback{{signal="good",version="{version}"}}' in metrics
    print(f"promoted after {sent} events:", live_figures["verdict"]["reason"])


def test_users_who_prefer_the_current_policy_get_the_canary_rejected(
        live: Callable[..., AppServer], enthusiastic_adapter: Path, tmp_path: Path) -> None:
    srv = live()
    version = register(srv, enthusiastic_adapter, tmp_path)
    assert admin(srv, "POST", f"/v1/policies/{version}/canary", json={"share": 0.5}).status_code == 200
    users = Users(srv, likes=lambda text: not is_enthusiastic(text))
    sent = users.until(lambda: status(srv, version) != "canary")
    assert status(srv, version) == "rejected", sent
    assert set(users.statuses) <= {200, 201}, users.statuses
    reason = admin(srv, "GET", f"/v1/policies/{version}").json()["reason"]
    assert "worse" in reason, reason
    # The rejected canary serves nothing more.
    after = {users.one(i) for i in range(40)}
    assert after == {"policy-0"}, after
    print(f"rejected after {sent} events: {reason}")


def test_operator_calls_and_bad_inputs(live: Callable[..., AppServer], enthusiastic_adapter: Path,
                                       tmp_path: Path) -> None:
    srv = live(canary_check_s=3600)  # no automatic decision during this test
    first, second = register(srv, enthusiastic_adapter, tmp_path), register(srv, enthusiastic_adapter, tmp_path)

    def refused(method: str, path: str, expected: int, code: str | None = None, **kw: Any) -> None:
        before = admin(srv, "GET", "/v1/policies").json()
        r = admin(srv, method, path, **kw)
        assert r.status_code == expected, r.text
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and (code is None or error["code"] == code)
        assert admin(srv, "GET", "/v1/policies").json() == before  # nothing changed

    for share in (0, 1, 1.5, -0.1, "half"):
        refused("POST", f"/v1/policies/{first}/canary", 400, json={"share": share})
    refused("POST", f"/v1/policies/{first}/canary/promote", 409, "no_canary")
    refused("POST", "/v1/policies/999/canary", 404)
    assert admin(srv, "POST", f"/v1/policies/{first}/canary", json={"share": 0.2}).json()["status"] == "canary"
    refused("POST", f"/v1/policies/{second}/canary/promote", 409, "not_the_canary")
    refused("POST", f"/v1/policies/{second}/canary/reject", 409, "not_the_canary")
    refused("POST", "/v1/policies/0/canary", 409, "not_a_candidate")
    user_key = httpx.post(f"{srv.url}/v1/policies/{first}/canary/promote",
                          headers={"Authorization": f"Bearer {USER}"}, timeout=30)
    assert user_key.status_code == 403 and status(srv, first) == "canary"

    # The share can change while it runs; stop sends it back to candidate; a second start runs it again.
    assert admin(srv, "POST", f"/v1/policies/{first}/canary", json={"share": 0.3}).status_code == 200
    assert srv.state.router.canary is not None and srv.state.router.canary.share == 0.3
    assert admin(srv, "POST", f"/v1/policies/{first}/canary/stop").json()["status"] == "candidate"
    assert srv.state.router.canary is None
    assert admin(srv, "POST", f"/v1/policies/{second}/canary").json()["status"] == "canary"  # --canary-share
    assert srv.state.router.canary.share == LIVE["canary_share"]
    # Putting another candidate on canary stops the running one; rejecting by hand ends it.
    assert admin(srv, "POST", f"/v1/policies/{first}/canary", json={"share": 0.1}).status_code == 200
    assert status(srv, second) == "candidate"
    assert admin(srv, "POST", f"/v1/policies/{first}/canary/reject").json()["status"] == "rejected"
    assert srv.state.router.canary is None
    evaluation = admin(srv, "GET", f"/v1/policies/{first}/evaluation").json()
    assert evaluation["live"]["decision"]["outcome"] == "rejected" and evaluation["status"] == "rejected"
    refused("GET", "/v1/policies/999/evaluation", 404)


def test_a_restart_resumes_the_experiment_from_the_database(
        engine_loop: LoopThread, engine: Any, demo_model_dir: Path, enthusiastic_adapter: Path,
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = settings_for(demo_model_dir, data_dir, api_keys=[USER], admin_keys=[ADMIN],
                            trainer={**LIVE, "canary_check_s": 0.3}, chat_requests_per_minute=0)
    srv = AppServer(engine_loop, create_app(settings, engine=engine)).start()
    staging = tmp_path / "staging"
    staging.mkdir()
    version = register(srv, enthusiastic_adapter, staging)
    assert admin(srv, "POST", f"/v1/policies/{version}/canary", json={"share": 0.4}).status_code == 200
    users = Users(srv, likes=lambda text: True)
    users.until(lambda: False, max_events=40)
    srv.loop.run(srv.state.canary.check())
    requests_before = admin(srv, "GET", f"/v1/policies/{version}/evaluation").json()["live"]["canary"]["requests"]
    srv.stop()

    again = AppServer(engine_loop, create_app(settings, engine=engine)).start()
    try:
        assert again.state.router.canary is not None and again.state.router.canary.version == version
        assert again.state.router.canary.share == 0.4
        live_figures = admin(again, "GET", f"/v1/policies/{version}/evaluation").json()["live"]
        assert live_figures["canary"]["requests"] >= requests_before > 0  # counts carried over
        assert status(again, version) == "canary"
    finally:
        again.stop()


def test_blind_side_by_side_picks_decide_the_canary(live: Callable[..., AppServer], enthusiastic_adapter: Path,
                                                    tmp_path: Path) -> None:
    """With side-by-side on, a request for two choices gets one from each version in random order (the response
    names both versions, not which is which); users pick the enthusiastic reply, so the canary's win rate rises until
    it is promoted. A side_by_side pick on an ordinary completion is refused and stores nothing."""
    srv = live(canary_share=0.05)
    version = register(srv, enthusiastic_adapter, tmp_path)
    started = admin(srv, "POST", f"/v1/policies/{version}/canary", json={"share": 0.05, "side_by_side": True})
    assert started.status_code == 200, started.text
    headers = {"Authorization": f"Bearer {USER}"}
    prompts = [p.text for p in training_prompts(64, seed=6)]
    orders: list[tuple[str, str]] = []
    shares: dict[int, list[bool]] = {}

    def pick(i: int) -> int:
        body = {"model": "alignd", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": 48, "temperature": 1.0, "n": 2, "user": f"picker-{i}", "stream": i % 3 == 0}
        if body["stream"]:
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=headers,
                              timeout=60) as r:
                assert r.status_code == 200
                texts, fingerprint, cid = ["", ""], None, None
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = msgspec.json.decode(line[6:])
                        cid, fingerprint = chunk["id"], chunk["system_fingerprint"]
                        for c in chunk["choices"]:
                            texts[c["index"]] += c["delta"].get("content") or ""
        else:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
            assert r.status_code == 200, r.text
            out = r.json()
            texts = [c["message"]["content"] for c in out["choices"]]
            fingerprint, cid = out["system_fingerprint"], out["id"]
        if fingerprint != f"policy-0+policy-{version}":  # the experiment ended while this request ran
            assert fingerprint == f"policy-{version}" and status(srv, version) == "promoted", fingerprint
            return 0
        stored = srv.loop.run(get_completion(srv.state.store, cid))
        orders.append(tuple(f"policy-{v}" for v in stored.params["side_by_side"]))
        styles = [is_enthusiastic(t) for t in texts]
        for v, style in zip(stored.params["side_by_side"], styles, strict=True):
            shares.setdefault(v, []).append(style)
        winner = 0 if styles[0] and not styles[1] else 1 if styles[1] and not styles[0] else "tie"
        fb = httpx.post(f"{srv.url}/v1/feedback", headers=headers, timeout=60,
                        json={"completion_id": cid, "kind": "side_by_side" if i % 2 else "pairwise", "winner": winner})
        assert fb.status_code == 201, fb.text
        return 1

    sent = 0
    with ThreadPoolExecutor(4) as pool:
        while status(srv, version) == "canary" and sent < 400:
            sent += sum(pool.map(pick, range(sent, sent + 12)))
    live_figures = admin(srv, "GET", f"/v1/policies/{version}/evaluation").json()["live"]
    print(f"side-by-side: {sent} picks:", {k: live_figures["canary"][k] for k in ("wins", "losses", "win_interval")},
          {v: sum(x) / len(x) for v, x in shares.items()})
    assert status(srv, version) == "promoted", live_figures
    assert live_figures["canary"]["wins"] > live_figures["canary"]["losses"]
    assert "win rate conclusively higher" in live_figures["decision"]["reason"]
    assert {o[0] for o in orders} == {"policy-0", f"policy-{version}"}  # both orders occurred: blind

    # A side_by_side pick on an ordinary completion (the canary is over): a 422 that stores nothing.
    plain = httpx.post(f"{srv.url}/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": "alignd", "messages": [{"role": "user", "content": "Hi"}], "n": 2,
                             "temperature": 1.0, "max_tokens": 8}).json()
    assert plain["system_fingerprint"] == f"policy-{version}"
    refused = httpx.post(f"{srv.url}/v1/feedback", headers=headers, timeout=60,
                         json={"completion_id": plain["id"], "kind": "side_by_side", "winner": 0})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "not_side_by_side", refused.text
    listed = admin(srv, "GET", "/v1/feedback", params={"completion_id": plain["id"]}).json()
    assert listed["data"] == []


def test_base_requests_batched_with_adapter_requests_get_no_adapter(
        engine: Any, engine_loop: LoopThread, enthusiastic_adapter: Path) -> None:
    """vLLM's CPU LoRA ops applied the last adapter slot to tokens without LoRA (index -1) in a mixed batch: with both
    slots taken, the base answered like the adapter. alignd.engine.cpu_lora (a vLLM plugin) masks them; here base and
    adapter requests for the same prompts run in the same batches and the base keeps its own style mix."""
    from alignd.protocol import SamplingOptions

    prompts = [engine.render_prompt([{"role": "user", "content": p.text}]) for p in training_prompts(48, seed=4)]
    options = SamplingOptions(n=1, max_tokens=48, temperature=1.0)

    async def share(version: int, tag: str) -> float:
        async def one(i: int, prompt: list[int]) -> str:
            final = None
            async for step in engine.generate(prompt, options, f"{tag}-{i}", version):
                final = step
            return final.choices[0].text

        texts = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        return sum(is_enthusiastic(t) for t in texts) / len(texts)

    async def mixed() -> tuple[float, float, float]:
        alone = await share(0, "base-alone")
        await engine.load_policy(901, enthusiastic_adapter)
        await engine.load_policy(902, enthusiastic_adapter)  # every slot taken
        try:
            base, adapter = await asyncio.gather(share(0, "base-mixed"), share(901, "adapter-mixed"))
        finally:
            await engine.unload_policy(901)
            await engine.unload_policy(902)
        return alone, base, adapter

    alone, base, adapter = engine_loop.run(mixed())
    print(f"enthusiastic share: base alone {alone:.2f}, base in mixed batches {base:.2f}, adapter {adapter:.2f}")
    assert adapter >= 0.8  # the adapter does write the style
    assert base <= alone + 0.25 and base <= 0.5, (alone, base, adapter)  # unfixed: base ~0.9, like the adapter


def test_the_sdk_and_the_cli_run_a_canary(live: Callable[..., AppServer], enthusiastic_adapter: Path,
                                          tmp_path: Path) -> None:
    from alignd.clients import AligndError, Client

    srv = live(canary_check_s=3600)
    version = register(srv, enthusiastic_adapter, tmp_path)
    with Client(srv.url, api_key=ADMIN) as client:
        assert client.policies.start_canary(version, 0.25, side_by_side=True).status == "canary"
        assert srv.state.router.canary.share == 0.25 and srv.state.router.canary.side_by_side
        evaluation = client.policies.evaluation(version)
        assert evaluation.status == "canary" and evaluation.live["share"] == 0.25
        other = register(srv, enthusiastic_adapter, tmp_path)
        with pytest.raises(AligndError) as refused:
            client.policies.promote_canary(other)
        assert refused.value.status == 409 and status(srv, version) == "canary"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alignd.cli", "policies", *args, "--url", srv.url,
                               "--admin-key", ADMIN], capture_output=True, text=True, timeout=120)

    shown = cli("evaluation", str(version))
    assert shown.returncode == 0 and "live test: share 0.25" in shown.stdout, shown.stdout + shown.stderr
    assert cli("canary-reject", str(version + 5)).returncode == 1
    assert cli("canary", str(version), "--share", "1.5").returncode == 2
    stopped = cli("canary-stop", str(version), "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["status"] == "candidate"
    listed = cli("list")
    assert listed.returncode == 0 and f"{version:>7}  candidate" in listed.stdout, listed.stdout
    assert cli("canary-promote", str(other)).returncode == 1  # no canary now: refused


def test_no_automatic_run_starts_while_a_canary_is_under_test(live: Callable[..., AppServer],
                                                              enthusiastic_adapter: Path, tmp_path: Path) -> None:
    """A new candidate would end the running live test before users decided it: the automatic trigger waits."""
    srv = live(training_trigger="auto", min_new_pairs=10_000, min_new_labels=8, min_interval_s=0,
               canary_check_s=3600, ppo_iterations=1, rollout_batch_size=8, trainer_threads=1)
    version = register(srv, enthusiastic_adapter, tmp_path)
    assert admin(srv, "POST", f"/v1/policies/{version}/canary", json={"share": 0.5}).status_code == 200
    Users(srv, likes=is_enthusiastic).until(lambda: False, max_events=20)
    time.sleep(7)  # longer than the trigger's poll (5 s): enough new labels, but a canary runs
    assert admin(srv, "GET", "/v1/training/runs").json()["data"] == []
    assert admin(srv, "POST", f"/v1/policies/{version}/canary/stop").status_code == 200
    deadline = time.monotonic() + 60
    while not (runs := admin(srv, "GET", "/v1/training/runs").json()["data"]):
        assert time.monotonic() < deadline, "no automatic run started once the canary ended"
        time.sleep(0.5)
    assert runs[0]["trigger"] == "auto"
    admin(srv, "POST", f"/v1/training/runs/{runs[0]['id']}/cancel")
