"""Poisoned feedback, end to end on the real server, engine and trainer: simulated users who prefer "friendly" replies
chat through a frontend key; one of them sends half of all events, and two contrary users (5% of the events) judge
the opposite way. One training run: the heavy user's share is capped to --max-user-share, the contrary users are
flagged (and listed for the operator), and the promoted policy still moves the honest way on held-out prompts.

The run's candidate is promoted by the operator whatever the gate said: what is tested here is what the reward model
and PPO learned from poisoned data, not the gate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from alignd.clients import Client
from alignd.clients.simulate import run_simulation
from alignd.demo.corpus import classify, held_out_prompts
from tests.serverkit import AppServer
from tests.test_security import bearer

ADMIN, WEB = "poison-admin-key-7a41", "poison-web-key-0c95"
PREFER = "friendly"
TRAINER = {"training_trigger": "manual", "ppo_iterations": 10, "rollout_batch_size": 32, "trainer_threads": 1,
           "gate_margin": -100.0, "kl_budget": 1000.0, "reward_model_confidence": 0.0}
# (name prefix, users, requests, contrary): 50% from one user, 45% from sixteen, 5% from two contrary ones.
CROWD = (("heavy-", 1, 400, False), ("sim-", 16, 360, False), ("contrary-", 2, 40, True))


def _share(srv: AppServer, model: str, prompts: list[str], n: int = 4) -> float:
    """The preferred style's share of ``model``'s replies to ``prompts`` (``n`` each, temperature 1)."""
    liked = total = 0
    with Client(srv.url, api_key=WEB) as client:
        for prompt in prompts:
            answer = client.chat([{"role": "user", "content": prompt}], model=model, n=n, temperature=1.0,
                                 max_tokens=96)
            liked += sum(classify(c.message.content).style == PREFER for c in answer.choices)
            total += len(answer.choices)
    return liked / total


@pytest.fixture(scope="module")
def poisoned(make_server: Callable[..., AppServer]) -> dict[str, Any]:
    srv = make_server(admin_keys=[ADMIN], keys=[f"web:frontend:{WEB}"], trainer=TRAINER,
                      chat_requests_per_minute=0, chat_max_concurrent=0)
    errors: list[BaseException] = []

    def crowd(prefix: str, users: int, requests: int, contrary: bool) -> None:
        try:
            with Client(srv.url, api_key=WEB) as client:
                run_simulation(client, prefer=PREFER, requests=requests, seed=len(prefix), concurrency=2,
                               max_tokens=96, users=users, user_prefix=prefix, contrary=contrary)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=crowd, args=spec) for spec in CROWD]  # interleaved, as live traffic is
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    with Client(srv.url, api_key=ADMIN) as admin:
        run = admin.training.start()
        while run.status == "running":
            threading.Event().wait(2)
            run = admin.training.get(run.id)
        if run.candidate is not None:  # whatever the gate and canary made of it: the operator promotes it
            admin.policies.promote(run.candidate)
    prompts = [p.text for p in held_out_prompts(48, seed=5)]
    return {"srv": srv, "run": run, "base": _share(srv, "alignd@0", prompts),
            "promoted": _share(srv, "alignd", prompts)}


def test_the_contrary_few_are_flagged_and_the_policy_moves_the_honest_way(poisoned: dict[str, Any]) -> None:
    run, srv = poisoned["run"], poisoned["srv"]
    assert run.status == "succeeded" and run.candidate is not None, run.error
    users = run.metrics["users"]
    print("users report:", users, f"share {poisoned['base']:.3f} -> {poisoned['promoted']:.3f}")
    assert {u["user"] for u in users["flagged"]} == {"contrary-0", "contrary-1"}, users["flagged"]
    assert all(u["agreement"] < 0.5 and u["p_value"] < 0.01 for u in users["flagged"])
    assert users["scored_users"] == 19
    # The promoted policy, trained without them, moved the honest way on prompts it never saw (192 replies each: the
    # standard error of the difference is about 0.05).
    assert poisoned["promoted"] >= poisoned["base"] + 0.10, poisoned
    # The operator sees them, flagged first, with the run's scores.
    listed = httpx.get(f"{srv.url}/v1/admin/users", params={"flagged": "true"}, headers=bearer(ADMIN)).json()["data"]
    assert {u["user"] for u in listed} == {"contrary-0", "contrary-1"}
    assert all(u["scored_run"] == run.id and u["judgements"] >= 7 and u["trust"] == "default" for u in listed)
    # The honest users are scored too, none flagged, and as a group they agree with the consensus (one user's ~16
    # judgements are too few to say so of each: sim-3 once scored 0.31 without being flagged).
    honest = [httpx.get(f"{srv.url}/v1/admin/users/sim-{i}", headers=bearer(ADMIN)).json()["trust"] for i in range(16)]
    scored = sorted(u["agreement"] for u in honest if u.get("agreement") is not None)
    assert not any(u["flagged"] for u in honest) and len(scored) >= 12, honest
    assert scored[len(scored) // 2] > 0.5, scored


def test_one_user_sending_half_of_the_events_is_capped(poisoned: dict[str, Any]) -> None:
    pairs = poisoned["run"].metrics["users"]["share"]["pairs"]
    assert pairs["largest_share_before"] >= 0.35  # the heavy user's pairs before the cap
    assert pairs["largest_share_after"] <= 0.1 + 1e-6
    [heavy] = [u for u in pairs["capped"] if u["user"] == "heavy-0"]
    assert heavy["share_before"] == pairs["largest_share_before"] and heavy["share_after"] == pytest.approx(0.1)
    assert pairs["users"] == 17  # the contrary two left out
    assert pairs["effective_users"] > 10  # sixteen honest users and a capped heavy one: more than ten equal ones
