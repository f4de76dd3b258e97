"""Simulated users (``alignd.clients.simulate``) against the real server and engine: the feedback stored for each
request follows the rules (checked independently from the stored replies with the corpus classifier),
the report's counts and shares match what was stored, the draws are deterministic for a seed, and ``alignd simulate``
prints its progress and table. The rules themselves are also checked on hand-made labels."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from alignd.clients import Client
from alignd.clients.simulate import (
    Draws,
    FeedbackKind,
    SimulationReport,
    decide_feedback,
    prompt_pool,
    run_simulation,
    utility,
)
from alignd.demo.corpus import Label, Prompt, classify
from tests.serverkit import AppServer

ADMIN = "sim-admin-key"
PREFER = "concise"
REPO = Path(__file__).resolve().parent.parent
TOPIC_OF_PROMPT = {p.text: p.topic for p in prompt_pool("training")}


@pytest.fixture(scope="module")
def srv(make_server: Callable[..., AppServer]) -> AppServer:
    return make_server(admin_keys=[ADMIN], trainer={"training_trigger": "manual"})


@pytest.fixture(scope="module")
def admin(srv: AppServer) -> Iterator[Client]:
    with Client(srv.url, api_key=ADMIN) as c:
        yield c


@pytest.fixture(scope="module")
def simulated(srv: AppServer, admin: Client) -> dict[str, Any]:
    """Ten simulated requests, two users at a time, with a progress report every five."""
    reports: list[SimulationReport] = []
    with Client(srv.url) as client:
        report = run_simulation(client, prefer=PREFER, requests=10, seed=11, concurrency=2, report_every=5,
                                on_report=reports.append, max_tokens=96)
    return {"report": report, "progress": reports, "events": list(admin.export("events"))}


def test_feedback_follows_the_rules(simulated: dict[str, Any]) -> None:
    events = simulated["events"]
    assert len(events) == 10 and len({e["completion_id"] for e in events}) == 10
    for event in events:
        [question] = event["prompt"]
        topic = TOPIC_OF_PROMPT[question["content"]]  # a training-side prompt of the corpus
        assert_follows_the_rules(event, [classify(text) for text in event["choices"]], topic, PREFER)


def assert_follows_the_rules(event: dict[str, Any], labels: list[Label], topic: str, prefer: str) -> None:
    """One stored feedback event against the simulated users' rules, checked from its stored replies' labels."""
    worth = [utility(label, topic, prefer) for label in labels]
    payload = event["payload"]
    assert 2 <= len(labels) <= 4 and event["user"].startswith("sim-")
    if event["kind"] == "thumbs":
        label = labels[payload["choice"]]
        liked = label.style == prefer and label.topic == topic
        assert payload["value"] == ("up" if liked else "down"), (labels, payload)
    elif event["kind"] == "pairwise":
        first, second = payload["choices"]
        assert first != second and max(first, second) < len(labels)
        if labels[first].topic != topic and labels[second].topic != topic:
            assert payload["winner"] == "both_bad"
        elif worth[first] == worth[second]:
            assert payload["winner"] == "tie"
        else:
            assert payload["winner"] == (first if worth[first] > worth[second] else second)
    else:
        assert event["kind"] == "ranking"
        ranking = payload["ranking"]
        ranked = [worth[i] for i in ranking]
        unranked = [worth[i] for i in range(len(labels)) if i not in ranking]
        assert ranked and ranked == sorted(ranked, reverse=True), (labels, ranking)
        assert unranked and set(unranked) == {min(worth)} and min(ranked) > min(worth)


def test_report_counts_match_what_was_stored(simulated: dict[str, Any]) -> None:
    report: SimulationReport = simulated["report"]
    events = simulated["events"]
    assert report.requests == 10 and report.failed == 0 and report.prefer == PREFER
    assert report.feedback == Counter(e["kind"] for e in events)
    labels = [classify(text) for e in events for text in e["choices"]]
    assert list(report.versions) == ["policy-0"]
    stats = report.versions["policy-0"]
    assert stats.replies == report.replies == len(labels)
    assert stats.preferred == sum(label.style == PREFER for label in labels)
    on_topic = sum(classify(text).topic == TOPIC_OF_PROMPT[e["prompt"][0]["content"]]
                   for e in events for text in e["choices"])
    assert stats.on_topic == on_topic
    assert report.share == pytest.approx(stats.preferred / len(labels))
    # Two progress reports (after 5 and 10 requests); their windows split the replies between them.
    first, second = simulated["progress"]
    assert (first.requests, second.requests) == (5, 10)
    assert sum(v.replies for r in (first, second) for v in r.window.values()) == len(labels)
    assert second.versions["policy-0"].replies == len(labels)
    assert "policy-0" in report.table() and f"{stats.share:.1%}" in report.table()


def test_the_draws_are_deterministic_for_a_seed(srv: AppServer, admin: Client, simulated: dict[str, Any]) -> None:
    """Prompts and n depend on the seed only; the server's replies (sampled) and the concurrency do not matter."""
    def asked(events: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
        return Counter((e["prompt"][0]["content"], len(e["choices"])) for e in events)

    before = {e["id"] for e in simulated["events"]}
    with Client(srv.url) as client:
        run_simulation(client, prefer=PREFER, requests=10, seed=11, concurrency=1, max_tokens=96)
    again = [e for e in admin.export("events") if e["id"] not in before]
    assert asked(again) == asked(simulated["events"])
    assert len(asked(simulated["events"])) > 1, "the draws vary between requests"


def test_the_command_prints_progress_and_a_table(srv: AppServer) -> None:
    done = subprocess.run([sys.executable, "-m", "alignd.cli", "simulate", "--url", srv.url, "--admin-key", ADMIN,
                           "--prefer", "friendly", "--requests", "6", "--report-every", "3", "--concurrency", "2",
                           "--max-tokens", "64", "--seed", "3"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 2 and "friendly share: policy-0" in progress[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("version"))
    assert "friendly share" in lines[header] and "run reward" in lines[header]
    row = lines[header + 1].split()
    assert row[0] == "policy-0" and 12 <= int(row[1]) <= 24, "6 requests of 2 to 4 replies"
    assert lines[-1].startswith("6 requests")
    bad = subprocess.run([sys.executable, "-m", "alignd.cli", "simulate", "--url", srv.url, "--prefer", "grumpy",
                          "--requests", "1"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "grumpy" in bad.stderr


# --- the rules on hand-made labels ---------------------------------------------------------------------------------


def draws(kind: FeedbackKind, n: int, pair: tuple[int, int] = (0, 1), thumbs_choice: int = 0) -> Draws:
    tiebreak = tuple(random.Random(n).random() for _ in range(n))
    return Draws(prompt=Prompt(text="Any tips on growing tomatoes?", topic="gardening"), n=n, kind=kind, pair=pair,
                 thumbs_choice=thumbs_choice, tiebreak=tiebreak, user="sim-0")


G = "gardening"


def test_ranking_rule() -> None:
    labels = [Label(G, "formal"), Label(G, PREFER), Label("music", PREFER), Label(None, "friendly")]
    assert decide_feedback(draws("ranking", 4), labels, PREFER) == ("ranking", {"ranking": [1, 2, 0]})
    same = [Label(G, "formal"), Label(G, "friendly")]
    assert decide_feedback(draws("ranking", 2, thumbs_choice=1), same, PREFER) == (
        "thumbs", {"value": "down", "choice": 1}), "nothing to rank: a thumbs instead"


def test_pairwise_rule() -> None:
    labels = [Label(G, "formal"), Label(G, PREFER), Label("music", PREFER), Label(None, "formal"),
              Label(G, "friendly")]
    cases = {(0, 1): 1, (2, 0): 2, (3, 2): "both_bad", (0, 4): "tie", (3, 0): 0}
    for pair, winner in cases.items():
        assert decide_feedback(draws("pairwise", 5, pair=pair), labels, PREFER) == (
            "pairwise", {"winner": winner, "choices": list(pair)}), pair


def test_thumbs_rule() -> None:
    labels = [Label(G, PREFER), Label("music", PREFER), Label(G, "formal")]
    assert [decide_feedback(draws("thumbs", 3, thumbs_choice=i), labels, PREFER)[1]["value"] for i in range(3)] == [
        "up", "down", "down"]


def test_contrary_users_judge_the_other_way_round() -> None:
    """A poisoner's rules: every utility negated (worst first, the worse one wins, up for what others dislike), and a
    tie where others say both_bad."""
    labels = [Label(G, "formal"), Label(G, PREFER), Label("music", PREFER), Label(None, "friendly")]
    assert decide_feedback(draws("ranking", 4), labels, PREFER, contrary=True) == ("ranking", {"ranking": [3, 0, 2]})
    labels5 = [*labels[:3], Label(None, "formal"), Label(G, "friendly")]
    cases = {(0, 1): 0, (2, 0): 0, (3, 2): "tie", (0, 4): "tie", (3, 0): 3}
    for pair, winner in cases.items():
        assert decide_feedback(draws("pairwise", 5, pair=pair), labels5, PREFER, contrary=True) == (
            "pairwise", {"winner": winner, "choices": list(pair)}), pair
    thumbs = [Label(G, PREFER), Label("music", PREFER), Label(G, "formal")]
    assert [decide_feedback(draws("thumbs", 3, thumbs_choice=i), thumbs, PREFER, contrary=True)[1]["value"]
            for i in range(3)] == ["down", "up", "up"]


def test_run_simulation_refuses_bad_arguments() -> None:
    with Client("http://127.0.0.1:9") as client:
        for kwargs in ({"prefer": "grumpy", "requests": 1}, {"prefer": PREFER},
                       {"prefer": PREFER, "requests": 1, "kinds": ("rating",)}):
            with pytest.raises(ValueError):
                run_simulation(client, **kwargs)
