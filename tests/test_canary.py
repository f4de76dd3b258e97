"""The live A/B test on the real engine: a candidate on canary answers a share of users (sticky per user), simulated
users judge the replies with thumbs, and the always-valid tests promote or reject it by themselves, with no failed
request throughout. Also the operator calls and the bad inputs (OpenAI-shaped 4xx, nothing changed)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from alignd.app import create_app
from alignd.demo.corpus import classify, training_prompts
from alignd.trainer.config import TrainerConfig
from alignd.trainer.models import POLICY, load_stack
from tests.engine_fixtures import test_settings as settings_for
from tests.serverkit import AppServer, LoopThread
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
    # Sticky: during the experiment each user got one version (after the flip, only the new one).
    mixed = [who for who, prints in users.seen.items() if len(prints) > 1]
    assert len(mixed) <= 2, users.seen  # at most the users who were mid-request at the flip
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
