"""The trainer process killed with SIGKILL as it enters each phase of a run (``ALIGND_FAILPOINT=trainer:<phase>``,
:mod:`alignd.faults`): the run is marked failed with the signal, nothing it staged is registered or promoted, the
feedback it read stays unused and stored, serving goes on, and the next run succeeds. The server and engine are the
real ones of the test session; the trainer is a real process, killed by the kernel."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from alignd.faults import FAILPOINT_ENV
from alignd.trainer.run import PHASE_START
from tests.serverkit import AppServer
from tests.test_training import admin, app_factory, chat, give_feedback, wait_run  # noqa: F401 (a fixture)

PHASES = list(PHASE_START)  # data, reward_model, normalize, ppo, gate, register


@pytest.fixture(scope="module")
def srv(app_factory: Callable[..., AppServer],  # noqa: F811 (the fixture)
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """A server with feedback to train on; one PPO iteration per run."""
    server = app_factory(tmp_path_factory.mktemp("trainer-faults"), ppo_iterations=1)
    give_feedback(server, n_prompts=8)
    yield server


def _state(srv: AppServer) -> dict[str, Any]:
    store = srv.state.store
    events = srv.loop.run(store.list_feedback(limit=1000))
    policies = admin(srv, "GET", "/v1/policies").json()
    policies.pop("replicas")  # the replicas' heartbeats (last seen) move on by themselves
    return {"policies": policies, "events": sorted(e.id for e in events),
            "unused": srv.loop.run(store.count_unused_signal())}


@pytest.mark.parametrize("phase", PHASES)
def test_a_trainer_killed_in_a_phase_fails_the_run_and_changes_nothing(
        srv: AppServer, phase: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _state(srv)
    monkeypatch.setenv(FAILPOINT_ENV, f"trainer:{phase}")  # the trainer process inherits it when it starts
    started = admin(srv, "POST", "/v1/training/runs")
    assert started.status_code == 202, started.text
    run = wait_run(srv, started.json()["id"])
    assert run["status"] == "failed" and "killed by signal 9" in run["error"], run
    assert run["candidate"] is None and run["promoted"] is False
    assert run["phase"] in ("starting", *PHASES[: PHASES.index(phase)]), "it died entering the phase, not later"
    # Nothing staged was registered or promoted; the feedback it read is stored and still unused.
    assert _state(srv) == before
    assert not (Path(srv.state.settings.data_path) / "policies").exists() or not any(
        (Path(srv.state.settings.data_path) / "policies").iterdir())
    assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-0"


def test_after_the_killed_runs_the_next_run_succeeds(srv: AppServer) -> None:
    before = _state(srv)
    run = wait_run(srv, admin(srv, "POST", "/v1/training/runs").json()["id"])
    assert run["status"] == "succeeded" and run["promoted"] is True, run["error"]
    assert chat(srv, "Hello").json()["system_fingerprint"] == f"policy-{run['candidate']}"
    assert _state(srv)["events"] == before["events"]
