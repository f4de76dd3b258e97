"""The SDK's operator methods (``policies``, ``training``) against the real server, engine and trainer process:
no data → 409, a run started and followed to its promotion, a second start refused while it runs, listing, rollback
and promotion, cancelling a run, permissions, the async client, and the simulation report's run figures.

Budgets are tiny (one or two PPO iterations of eight rollouts): these tests check the calls, not learning."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from statistics import fmean
from typing import Any

import pytest

from alignd.clients import AsyncClient, Client, ConflictError, NotFoundError, PermissionDeniedError
from alignd.clients.simulate import run_simulation
from alignd.protocol import Policy, PolicyList, TrainingRun, TrainingRunList
from tests.serverkit import AppServer

ADMIN, USER = "sdk-admin-secret", "sdk-user-secret"
TRAINER = {"training_trigger": "manual", "ppo_iterations": 2, "rollout_batch_size": 8, "max_new_tokens": 24,
           "gate_margin": -100.0, "kl_budget": 1000.0, "trainer_threads": 1,
           "reward_model_confidence": 0.0,  # machinery, not learning: a handful of pairs proves no reward model
           "canary_share": 0.0}  # promoted at once (the canary's calls: tests/test_canary.py)


@pytest.fixture(scope="module")
def srv(make_server: Callable[..., AppServer]) -> AppServer:
    return make_server(api_keys=[USER], admin_keys=[ADMIN], trainer=TRAINER)


@pytest.fixture(scope="module")
def admin(srv: AppServer) -> Iterator[Client]:
    with Client(srv.url, api_key=ADMIN, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def user(srv: AppServer) -> Iterator[Client]:
    with Client(srv.url, api_key=USER) as c:
        yield c


def wait_run(admin: Client, run_id: str, timeout: float = 900) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while (run := admin.training.get(run_id)).status == "running":
        assert time.monotonic() < deadline, f"run {run_id} still running after {timeout} s"
        time.sleep(0.5)
    return run


@pytest.fixture(scope="module")
def trained(admin: Client, user: Client) -> dict[str, Any]:
    """One run: refused without data, then started after simulated feedback and followed to its end."""
    with pytest.raises(ConflictError) as no_data:
        admin.training.start()
    run_simulation(user, prefer="friendly", requests=12, seed=5, max_tokens=24)
    started = admin.training.start(iterations=2, rollout_batch_size=8)
    with pytest.raises(ConflictError) as busy:
        admin.training.start()
    finished = wait_run(admin, started.id)
    return {"no_data": no_data.value, "started": started, "busy": busy.value, "finished": finished}


def test_start_get_list(trained: dict[str, Any], admin: Client) -> None:
    assert trained["no_data"].code == "no_training_data" and trained["no_data"].status == 409
    started: TrainingRun = trained["started"]
    assert isinstance(started, TrainingRun)
    assert (started.status, started.trigger, started.parent) == ("running", "manual", 0)
    assert started.config.get("ppo_iterations", 2) == 2
    assert trained["busy"].code == "run_in_progress" and started.id in trained["busy"].message

    finished: TrainingRun = trained["finished"]
    assert finished.id == started.id
    assert finished.status == "succeeded", finished.error
    assert (finished.candidate, finished.promoted, finished.progress) == (1, True, 1.0)
    assert len(finished.metrics["ppo"]) == 2

    listed = admin.training.list()
    assert isinstance(listed, TrainingRunList) and started.id in [r.id for r in listed.data]
    assert [r.id for r in admin.training.list(limit=1).data] == [started.id]
    with pytest.raises(NotFoundError):
        admin.training.get("run-does-not-exist")


def test_policies_list_get_rollback_promote(trained: dict[str, Any], admin: Client, user: Client) -> None:
    policies = admin.policies.list()
    assert isinstance(policies, PolicyList) and policies.promoted == 1
    assert {p.version: p.status for p in policies.data} == {1: "promoted", 0: "retired"}
    one = admin.policies.get(1)
    assert isinstance(one, Policy) and one.run_id == trained["finished"].id and one.parent == 0 and one.loaded

    back = admin.policies.rollback()
    assert back.version == 0 and admin.policies.list().promoted == 0
    assert user.chat([{"role": "user", "content": "Hello"}], max_tokens=4).system_fingerprint == "policy-0"
    again = admin.policies.promote(1)
    assert (again.version, again.status) == (1, "promoted")
    assert user.chat([{"role": "user", "content": "Hello"}], max_tokens=4).system_fingerprint == "policy-1"
    assert admin.policies.rollback(version=0).version == 0
    assert admin.policies.promote(1).status == "promoted"  # leave version 1 serving
    with pytest.raises(NotFoundError):
        admin.policies.get(99)
    with pytest.raises(NotFoundError):
        admin.policies.promote(99)


def test_cancel(trained: dict[str, Any], admin: Client, user: Client) -> None:
    run_simulation(user, prefer="friendly", requests=6, seed=6, max_tokens=24)
    started = admin.training.start(iterations=2, promote=False)
    cancelled = admin.training.cancel(started.id)
    assert cancelled.id == started.id and cancelled.status == "cancelled"
    assert admin.training.get(started.id).status == "cancelled"
    assert admin.policies.list().promoted == 1, "a cancelled run changes nothing"
    with pytest.raises(NotFoundError):
        admin.training.cancel("run-does-not-exist")


def test_operator_methods_need_an_admin_key(trained: dict[str, Any], user: Client) -> None:
    run_id = trained["started"].id
    calls: list[Callable[[], Any]] = [
        user.policies.list, lambda: user.policies.get(1), lambda: user.policies.promote(0), user.policies.rollback,
        user.training.list, user.training.start, lambda: user.training.get(run_id),
        lambda: user.training.cancel(run_id)]
    for call in calls:
        with pytest.raises(PermissionDeniedError) as e:
            call()
        assert e.value.status == 403 and e.value.type == "permission_error"


def test_simulation_report_shows_the_run_of_each_version(trained: dict[str, Any], admin: Client,
                                                          user: Client) -> None:
    report = run_simulation(user, prefer="friendly", requests=4, seed=7, max_tokens=24, admin=admin)
    assert list(report.versions) == ["policy-1"] and report.runs_unavailable is None
    figures = report.runs[1]
    finished: TrainingRun = trained["finished"]
    assert figures.run_id == finished.id and figures.status == "succeeded"
    assert figures.reward == pytest.approx(fmean(it["reward"] for it in finished.metrics["ppo"]))
    assert figures.kl == pytest.approx(fmean(it["kl"] for it in finished.metrics["ppo"]))
    table = report.table()
    assert finished.id in table and "policy-1" in table
    # Without admin rights the report says why the runs are missing instead of failing.
    refused = run_simulation(user, prefer="friendly", requests=1, seed=8, max_tokens=24, admin=user)
    assert refused.runs == {} and refused.runs_unavailable and "403" in refused.runs_unavailable


async def test_async_operator_methods(trained: dict[str, Any], srv: AppServer) -> None:
    async with AsyncClient(srv.url, api_key=ADMIN) as admin:
        policies = await admin.policies.list()
        assert policies.promoted == 1
        assert (await admin.policies.get(1)).status == "promoted"
        run = await admin.training.get(trained["started"].id)
        assert run.status == "succeeded"
        assert trained["started"].id in [r.id for r in (await admin.training.list(limit=5)).data]
        assert (await admin.policies.rollback()).version == 0
        assert (await admin.policies.promote(1)).status == "promoted"
