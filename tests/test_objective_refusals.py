"""Through the real server: an objective the stored feedback cannot train is refused before anything starts (409 in
OpenAI's error shape naming ``objective``, no run row), online DPO without any preference pair and KTO without any
good/bad label; the automatic trigger skips such a run and says why in the log. A serving replica (``--trainer off``)
refuses such a run the same way rather than queue it for the trainer process. With both kinds of feedback, a run of
each goes through the trainer process, its users' feedback reaching the objective, to a registered candidate."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from alignd.app import create_app
from alignd.demo.corpus import training_prompts
from alignd.trainer.queue import RunQueue
from tests.engine_fixtures import create_pg_database
from tests.engine_fixtures import test_settings as settings_for
from tests.serverkit import AppServer, LoopThread
from tests.test_training import (  # noqa: F401 (the fixture)
    ADMIN,
    TRAINER,
    USER,
    admin,
    app_factory,
    chat,
    give_feedback,
    wait_run,
)


def give_thumbs(srv: AppServer, n_prompts: int = 4) -> None:
    """Thumbs on each reply, up and down in turn: good/bad labels, no preference pair."""
    for i, prompt in enumerate(training_prompts(n_prompts, seed=4)):
        r = chat(srv, prompt.text)
        assert r.status_code == 200, r.text
        fb = httpx.post(f"{srv.url}/v1/feedback", json={"completion_id": r.json()["id"], "kind": "thumbs",
                                                        "choice": 0, "value": "up" if i % 2 == 0 else "down"},
                        headers={"Authorization": f"Bearer {USER}"}, timeout=30)
        assert fb.status_code == 201 and fb.json()["pairs"] == 0 and fb.json()["labels"] == 1, fb.text


def assert_refused(srv: AppServer, objective: str, code: str, says: str) -> None:
    before = admin(srv, "GET", "/v1/training/runs").json()["data"]
    refused = admin(srv, "POST", "/v1/training/runs", json={"objective": objective})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "objective" and error["code"] == code and says in error["message"], error
    assert admin(srv, "GET", "/v1/training/runs").json()["data"] == before
    assert srv.state.trainer.current is None


def test_online_dpo_without_any_pair_is_refused(app_factory: Callable[..., AppServer],  # noqa: F811
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = app_factory(tmp_path_factory.mktemp("thumbs-only"))
    give_thumbs(srv)
    assert_refused(srv, "online-dpo", "objective_needs_pairs", "preference pairs")


def test_kto_without_any_label_is_refused(app_factory: Callable[..., AppServer],  # noqa: F811
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = app_factory(tmp_path_factory.mktemp("pairs-only"))
    give_feedback(srv, n_prompts=4)  # pairwise comparisons: pairs, no labels
    assert_refused(srv, "kto", "objective_needs_labels", "good/bad labels")


def test_a_serving_replica_refuses_kto_without_any_label_and_queues_nothing(
        engine_loop: LoopThread, engine: Any, demo_model_dir: Path, postgres_server_url: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """``alignd serve --trainer off`` on PostgreSQL (in process, on the shared engine): its training-run service is the
    queue, which refuses before queuing, as the trainer would refuse before starting."""
    database = create_pg_database(postgres_server_url, f"replica_refusal_{uuid.uuid4().hex[:8]}")
    settings = settings_for(demo_model_dir, tmp_path_factory.mktemp("replica"), api_keys=[USER], admin_keys=[ADMIN],
                            trainer=TRAINER, database=database, chat_requests_per_minute=0)
    srv = AppServer(engine_loop, create_app(settings, engine=engine, role="serve")).start()
    try:
        assert isinstance(srv.state.trainer, RunQueue)
        give_feedback(srv, n_prompts=4)  # pairwise comparisons: pairs, no labels
        refused = admin(srv, "POST", "/v1/training/runs", json={"objective": "kto"})
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == "objective" and error["code"] == "objective_needs_labels", error
        assert "good/bad labels" in error["message"] and "preference pairs" in error["message"], error
        assert admin(srv, "GET", "/v1/training/runs").json()["data"] == []
        assert srv.loop.run(srv.state.store.list_runs()) == []  # nothing queued for the trainer process
        # The objective the pairs can train is queued (the refusal was the objective's, not the replica's).
        queued = admin(srv, "POST", "/v1/training/runs", json={"objective": "online-dpo"})
        assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text
    finally:
        srv.stop()


def test_the_automatic_trigger_skips_a_run_its_objective_cannot_train(
        app_factory: Callable[..., AppServer], tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """An auto-triggering server whose objective is online-dpo, with enough new labels to be due but no pair: no run
    starts, and the log says why once."""
    srv = app_factory(tmp_path_factory.mktemp("auto-skip"), training_trigger="auto", objective="online-dpo",
                      min_new_labels=2, min_new_pairs=1000, min_interval_s=0.0)
    # On the supervisor's logger itself: the app's logging setup replaced the root logger's handlers, caplog's too.
    supervisor_log = logging.getLogger("alignd.trainer.supervisor")
    supervisor_log.addHandler(caplog.handler)
    try:
        give_thumbs(srv, n_prompts=3)
        assert_skipped_once(srv, caplog)
    finally:
        supervisor_log.removeHandler(caplog.handler)


def assert_skipped_once(srv: AppServer, caplog: pytest.LogCaptureFixture) -> None:
    """Within a few polls the trigger logs why it skips; two polls later no run exists and nothing more is logged."""
    deadline = time.monotonic() + 30
    skipped: list[Any] = []
    while time.monotonic() < deadline and len(skipped) == 0:
        time.sleep(1)
        skipped = [r for r in caplog.records if "automatic training run skipped" in r.getMessage()]
    assert skipped and "online-dpo" in skipped[0].getMessage(), [r.getMessage() for r in caplog.records]
    time.sleep(12)  # two more polls: still nothing started, and the reason is not logged again
    assert admin(srv, "GET", "/v1/training/runs").json()["data"] == []
    assert len([r for r in caplog.records if "automatic training run skipped" in r.getMessage()]) == 1


def test_a_run_of_each_trains_on_the_users_feedback(app_factory: Callable[..., AppServer],  # noqa: F811
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = app_factory(tmp_path_factory.mktemp("both-kinds"))
    give_feedback(srv, n_prompts=16)
    give_thumbs(srv, n_prompts=16)
    for objective, own in (("online-dpo", "user_pairs"), ("kto", "samples")):
        started = admin(srv, "POST", "/v1/training/runs", json={"iterations": 1, "objective": objective,
                                                                "promote": False})
        assert started.status_code == 202, started.text
        run = wait_run(srv, started.json()["id"])
        assert run["status"] == "succeeded", run["error"]
        assert run["config"]["objective"] == run["metrics"]["objective"] == objective
        [iteration] = run["metrics"]["ppo"]
        assert iteration["objective"] == objective and iteration[own] > 0, iteration
        assert isinstance(iteration["kl"], float) and isinstance(iteration["reward"], float)
        assert run["candidate"] is not None and run["metrics"]["kl_controller"]["kl_coef"] is None


def test_the_reward_model_check_stops_what_follows_the_reward_model_not_kto(
        app_factory: Callable[..., AppServer],  # noqa: F811 (the fixture)
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A handful of thumbs cannot show a reward model better than chance: a PPO run stops before optimising its
    scores, while KTO, which learns from the labels themselves, trains on them (the check's figures reported)."""
    srv = app_factory(tmp_path_factory.mktemp("unproven-rm"), reward_model_confidence=0.95, judge_fraction=0.0)
    give_thumbs(srv, n_prompts=8)
    runs = {}
    for objective in ("ppo", "kto"):
        started = admin(srv, "POST", "/v1/training/runs", json={"iterations": 1, "objective": objective,
                                                                "promote": False})
        assert started.status_code == 202, started.text
        runs[objective] = wait_run(srv, started.json()["id"])
    ppo, kto = runs["ppo"], runs["kto"]
    assert ppo["status"] == "failed" and "RewardModelNotBetterThanChance" in ppo["error"], ppo["error"]
    assert kto["status"] == "succeeded", kto["error"]
    interval = kto["metrics"]["reward_model"]["heldout_interval"]
    assert interval is None or interval[0] <= 0.5, interval  # the check would have stopped it
    assert kto["candidate"] is not None and kto["metrics"]["ppo"][0]["samples"] > 0
