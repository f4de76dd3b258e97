# ruff: noqa: F811 - the store fixtures are imported from test_store and used as parameters
"""Safeguards of the training data (``alignd.trainer.safeguards``): each judgement counts once, the share cap, the
agreement test, on hand-computed values; then on SQLite and PostgreSQL, what a run reads (collapsed, blocked users
left out, a heavy user capped) and the trust and score rows; then the operator's calls through real HTTP on the real
engine (``PATCH`` and ``GET /v1/admin/users``, the SDK and ``alignd users``), refusals OpenAI-shaped and changing
nothing, and alternating thumbs through the real thumbs plugin counting once."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from alignd.clients import Client, PermissionDeniedError, UnprocessableEntityError
from alignd.store import FeedbackRecord, Label, PreferencePair, Store
from alignd.store.users import UserScore
from alignd.trainer.config import DataConfig
from alignd.trainer.data import load_training_data
from alignd.trainer.safeguards import (
    UserSignal,
    apply_caps,
    binomial_low_tail,
    cap_factors,
    collapse,
)
from tests.serverkit import AppServer
from tests.test_security import assert_openai_error, bearer
from tests.test_store import make_record, store, store_url  # noqa: F401 - the fixtures, on both databases

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 1, tzinfo=UTC)


# --- 1. latest judgement only, on rows as the store returns them ------------------------------------------------


class Events:
    """Signal rows of feedback events on completions, as ``Store.signal_rows`` returns them."""

    def __init__(self) -> None:
        self.pairs: list[dict[str, Any]] = []
        self.labels: list[dict[str, Any]] = []
        self.silent: list[dict[str, Any]] = []
        self.n = 0

    def event(self, user: str, kind: str, *, completion: str = "c1", choice: int | None = None,
              payload: dict[str, Any] | None = None, pairs: list[tuple[int, int]] = (),  # type: ignore[assignment]
              labels: list[tuple[int, bool]] = ()) -> str:  # type: ignore[assignment]
        self.n += 1
        base = {"feedback_id": f"fb-{self.n:03d}", "completion_id": completion, "kind": kind, "user": user,
                "principal": "web", "created": T0 + timedelta(seconds=self.n), "event_choice": choice,
                "event_payload": payload or {}}
        self.pairs += [{**base, "id": len(self.pairs) + i, "chosen_choice": a, "rejected_choice": b}
                       for i, (a, b) in enumerate(pairs)]
        self.labels += [{**base, "id": len(self.labels) + i, "choice": c, "good": good}
                        for i, (c, good) in enumerate(labels)]
        if not pairs and not labels:
            self.silent.append(base)
        return base["feedback_id"]

    def thumbs(self, user: str, choice: int, up: bool, pair_with: int | None = None, **kw: Any) -> str:
        """A thumbs event as the plugin derives it: a label, and a pair with ``pair_with`` (the opposite verdict
        the completion's history held for that choice)."""
        pairs = [] if pair_with is None else [(choice, pair_with) if up else (pair_with, choice)]
        return self.event(user, "thumbs", choice=choice, pairs=pairs, labels=[(choice, up)], **kw)

    def collapse(self) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, bool]]]:
        pairs, labels = collapse(self.pairs, self.labels, self.silent)
        return ([(r["feedback_id"], r["chosen_choice"], r["rejected_choice"]) for r in pairs],
                [(r["feedback_id"], r["choice"], r["good"]) for r in labels])


def test_alternating_thumbs_on_two_choices_leave_the_pair_of_their_final_verdicts() -> None:
    ev = Events()
    ev.thumbs("u", 0, True)  # fb-001
    ev.thumbs("u", 1, False, pair_with=0)  # fb-002: 0 > 1
    ev.thumbs("u", 0, True, pair_with=1)  # fb-003: 0 > 1 again (the plugin pairs with the latest verdict on 1)
    ev.thumbs("u", 1, False, pair_with=0)  # fb-004: 0 > 1 again
    ev.thumbs("u", 0, True, pair_with=1)  # fb-005
    assert ev.collapse() == ([("fb-005", 0, 1)], [("fb-004", 1, False), ("fb-005", 0, True)])

    flipped = Events()  # up 0, down 1, then the other way round: the final verdicts prefer 1
    flipped.thumbs("u", 0, True)
    flipped.thumbs("u", 1, False, pair_with=0)
    flipped.thumbs("u", 0, False)  # same verdict as 1 now: no pair
    flipped.thumbs("u", 1, True, pair_with=0)  # fb-004: 1 > 0
    assert flipped.collapse() == ([("fb-004", 1, 0)], [("fb-003", 0, False), ("fb-004", 1, True)])

    agree = Events()  # both up in the end: no preference left
    agree.thumbs("u", 0, True)
    agree.thumbs("u", 1, False, pair_with=0)
    agree.thumbs("u", 1, True)
    assert agree.collapse() == ([], [("fb-001", 0, True), ("fb-003", 1, True)])


def test_a_repeated_or_replaced_judgement_counts_once_per_user() -> None:
    ev = Events()
    for _ in range(5):  # the same ranking five times: its three pairs once
        ev.event("u", "ranking", pairs=[(0, 1), (0, 2), (1, 2)])
    ev.event("u", "ranking", completion="c2", pairs=[(0, 1), (0, 2), (1, 2)])
    ev.event("u", "ranking", completion="c2", pairs=[(2, 1), (2, 0), (1, 0)])  # fb-007 replaces fb-006
    ev.event("v", "ranking", completion="c2", pairs=[(0, 1), (0, 2), (1, 2)])  # another user's counts too
    ev.event("u", "pairwise", completion="c3", payload={"choices": [0, 1], "winner": 0}, pairs=[(0, 1)])
    ev.event("u", "pairwise", completion="c3", payload={"choices": [0, 1], "winner": "tie"})  # withdraws fb-009
    ev.event("u", "pairwise", completion="c3", payload={"choices": [2, 3], "winner": 3}, pairs=[(3, 2)])  # others
    pairs, labels = ev.collapse()
    assert sorted(pairs) == [("fb-005", 0, 1), ("fb-005", 0, 2), ("fb-005", 1, 2),
                             ("fb-007", 1, 0), ("fb-007", 2, 0), ("fb-007", 2, 1),
                             ("fb-008", 0, 1), ("fb-008", 0, 2), ("fb-008", 1, 2), ("fb-011", 3, 2)]
    assert labels == []


# --- 3. the share cap -------------------------------------------------------------------------------------------


def test_the_cap_lowers_only_the_largest_users_to_the_share() -> None:
    totals = {"heavy": 50.0, **{f"u{i}": 2.5 for i in range(20)}}  # heavy sent half
    factors = cap_factors(totals, 0.1)
    # c = 0.1 × (c + 50)  →  c = 50/9: the heavy user weighs 50/9 of its 50, the others are untouched.
    assert factors["heavy"] == pytest.approx((50 / 9) / 50)
    assert all(factors[f"u{i}"] == 1.0 for i in range(20))
    after = {u: w * factors[u] for u, w in totals.items()}
    assert after["heavy"] / sum(after.values()) == pytest.approx(0.1)

    two = cap_factors({"a": 40.0, "b": 30.0, **{f"u{i}": 1.0 for i in range(30)}}, 0.1)
    # Both large ones at c = 0.1 × (2c + 30)  →  c = 3.75.
    assert (two["a"], two["b"]) == (pytest.approx(3.75 / 40), pytest.approx(3.75 / 30))
    assert cap_factors({"a": 1.0, "b": 1.0, "c": 2.0}, 0.5) == {"a": 1.0, "b": 1.0, "c": 1.0}  # c holds 0.5
    # Fewer users than 1/share: the cap cannot be met, so all weigh the same (the smallest one's total).
    assert cap_factors({"a": 6.0, "b": 3.0, "c": 1.0}, 0.1) == {"a": pytest.approx(1 / 6),
                                                                   "b": pytest.approx(1 / 3), "c": 1.0}
    assert cap_factors({"alone": 7.0}, 0.1) == {"alone": 1.0}
    assert cap_factors({"a": 9.0, "b": 1.0}, 1.0) == {"a": 1.0, "b": 1.0}  # 1 turns the cap off


def test_capped_weights_and_the_report() -> None:
    pair = PreferencePair(prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b")
    signal = UserSignal(train_groups=[[pair]] * 15 + [[pair, pair]] * 5,
                        train_group_owners=[("heavy", None)] * 10 + [(f"u{i}", None) for i in range(10)],
                        train_labels=[Label(prompt=pair.prompt, reply="a", good=True)],
                        train_label_owners=[(None, "web")])
    groups, labels, figures = apply_caps(signal, 0.2)
    # Pair weight: heavy 10, u0-u4 1 each, u5-u9 2 each (a two-pair event); total 25, heavy 40%.
    # Capped: c = 0.2 × (c + 15)  →  c = 3.75, so each of heavy's pairs weighs 0.375.
    assert [p.weight for g in groups[:10] for p in g] == pytest.approx([0.375] * 10)
    assert [p.weight for g in groups[10:] for p in g] == [1.0] * 15
    shares = figures["pairs"]
    assert shares["users"] == 11 and shares["capped_users"] == 1
    assert shares["largest_share_before"] == 0.4 and shares["largest_share_after"] == pytest.approx(0.2)
    assert shares["capped"] == [{"user": "heavy", "share_before": 0.4, "share_after": 0.2}]
    after = [3.75, *[1.0] * 5, *[2.0] * 5]
    assert shares["effective_users"] == pytest.approx(round(1 / sum((w / 18.75) ** 2 for w in after), 2))
    assert labels[0].weight == 1.0 and figures["labels"]["users"] == 1  # one contributor: nothing to cap


# --- 4. agreement -----------------------------------------------------------------------------------------------


def test_the_binomial_tail_is_exact() -> None:
    assert binomial_low_tail(0, 8) == 1 / 256
    assert binomial_low_tail(1, 10) == 11 / 1024
    assert binomial_low_tail(4, 20) == pytest.approx(6196 / 1048576)
    assert binomial_low_tail(10, 20) > 0.5 and binomial_low_tail(20, 20) == 1.0
    assert binomial_low_tail(0, 0) == 1.0


# --- what a run reads, on SQLite and PostgreSQL ---------------------------------------------------------------


async def _event(store: Store, n: int, user: str | None, *, kind: str = "pairwise", choice: int | None = None,
                 payload: dict[str, Any] | None = None, completion: int | None = None,
                 pairs: list[tuple[int, int]] = (), labels: list[tuple[int, bool]] = (),  # type: ignore[assignment]
                 principal: str | None = "web") -> None:
    """Feedback event ``n`` by ``user`` on completion ``completion`` (default ``n``, created if new)."""
    c = n if completion is None else completion
    messages = [{"role": "user", "content": f"question {c}"}]
    if completion is None or completion == n:
        await store.record_completion(make_record(c, messages=messages, created=T0 + timedelta(seconds=c)))
    texts = [f"answer {c}", f"other answer {c}"]
    await store.record_feedback(FeedbackRecord(
        id=f"fb-{n:06d}", completion_id=f"chatcmpl-{c:06d}", kind=kind, choice=choice, payload=payload or {},
        user=user, comment=None, tags=[], idempotency_key=None, request_hash=None, policy_version=0,
        created=T0 + timedelta(seconds=n), principal=principal,
        pairs=[PreferencePair(prompt=messages, chosen=texts[a], rejected=texts[b], chosen_choice=a,
                              rejected_choice=b) for a, b in pairs],
        labels=[Label(prompt=messages, reply=texts[i], good=good, choice=i) for i, good in labels]))


def _owner_weights(data: Any) -> dict[str | None, float]:
    out: dict[str | None, float] = {}
    for group, who in zip(data.train_pairs, data.users.train_group_owners, strict=True):
        out[who[0]] = out.get(who[0], 0.0) + sum(p.weight for p in group)
    return out


async def test_a_run_reads_each_judgement_once_without_blocked_users_and_caps_a_heavy_one(store: Store) -> None:
    config = DataConfig(heldout_fraction=0.0, recency_half_life=10**9, max_user_share=0.1)
    n = 0
    for user in range(10):  # ten users, five events each
        for _ in range(5):
            n += 1
            await _event(store, n, f"user-{user}", pairs=[(0, 1)])
    for _ in range(50):  # one user sends as many as all of them
        n += 1
        await _event(store, n, "heavy", pairs=[(0, 1)])
    n += 1
    await _event(store, n, "heavy", completion=n - 1, pairs=[(0, 1)])  # the same judgement again
    for _ in range(5):
        n += 1
        await _event(store, n, "mallory", pairs=[(1, 0)])
    await store.set_trust("mallory", "blocked", note="spam", by="admin", when=T0)
    data = await load_training_data(store, config)

    report = data.users.report
    assert report["superseded_pairs"] == 1 and report["blocked_pairs"] == 5
    assert len(data.new_pair_ids) == 106  # every stored row is consumed, whether it counts or not
    weights = _owner_weights(data)
    assert "mallory" not in weights and sum(map(len, data.train_pairs)) == 100
    # The heavy user held half of the pairs; capped: c = 0.1 × (c + 50)  →  c = 50/9.
    assert weights["heavy"] == pytest.approx(50 / 9)
    assert weights["heavy"] / sum(weights.values()) == pytest.approx(0.1)
    assert all(weights[f"user-{u}"] == pytest.approx(5.0) for u in range(10))
    shares = report["share"]["pairs"]
    assert shares["largest_share_before"] == 0.5 and shares["largest_share_after"] == pytest.approx(0.1)
    assert shares["capped"][0]["user"] == "heavy" and shares["users"] == 11

    # Unblocked, mallory's feedback counts again: nothing was lost.
    await store.set_trust("mallory", "default", note=None, by="admin", when=T0)
    again = await load_training_data(store, config)
    assert _owner_weights(again)["mallory"] == pytest.approx(5.0)


async def test_trust_states_and_scores_round_trip(store: Store) -> None:
    assert await store.get_end_user("nobody") is None and await store.list_end_users() == []
    row = await store.set_trust("alice", "trusted", note="staff", by="ops", when=T0)
    assert (row.trust, row.note, row.updated_by, row.updated, row.flagged) == ("trusted", "staff", "ops", T0, False)
    await store.record_scores("run-1", [UserScore(user="bob", agreement=0.1, judgements=20, p_value=0.0002,
                                                  flagged=True),
                                        UserScore(user="alice", agreement=0.9, judgements=10, p_value=0.99,
                                                  flagged=False)], T0)
    alice = await store.get_end_user("alice")
    assert alice is not None and (alice.trust, alice.note, alice.agreement, alice.scored_run) == (
        "trusted", "staff", 0.9, "run-1")  # a score leaves the operator's state alone
    assert [r.user for r in await store.list_end_users()] == ["bob", "alice"]  # flagged first
    assert [r.user for r in await store.list_end_users(flagged=True)] == ["bob"]
    assert [r.user for r in await store.list_end_users(trust="trusted")] == ["alice"]
    assert await store.trust_states() == {"alice": "trusted"}
    await store.forget_user_scores("bob")  # their data was deleted: an unscored default user has no row
    await store.forget_user_scores("alice")
    assert await store.get_end_user("bob") is None
    alice = await store.get_end_user("alice")
    assert alice is not None and alice.trust == "trusted" and alice.agreement is None


# --- the operator's calls, through real HTTP on the real engine ----------------------------------------------

ADMIN, WEB = "trust-admin-key-3b1d", "trust-web-key-8c2e"


@pytest.fixture(scope="module")
def srv(make_server: Any) -> AppServer:
    return make_server(admin_keys=[ADMIN], keys=[f"web:frontend:{WEB}"])


def _admin(srv: AppServer, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{srv.url}{path}", headers=bearer(ADMIN), timeout=30, **kw)


def test_an_operator_blocks_trusts_and_lists_users_and_refusals_change_nothing(srv: AppServer) -> None:
    assert _admin(srv, "GET", "/v1/admin/users").json() == {"data": [], "object": "list"}
    missing = _admin(srv, "GET", "/v1/admin/users/mallory")
    assert_openai_error(missing, 404, "invalid_request_error", "user_not_found")
    r = _admin(srv, "PATCH", "/v1/admin/users/mallory", json={"trust": "blocked", "note": "contrary votes"})
    assert r.status_code == 200, r.text
    blocked = r.json()
    assert (blocked["user"], blocked["trust"], blocked["note"], blocked["flagged"]) == (
        "mallory", "blocked", "contrary votes", False)
    assert blocked["updated_by"] and blocked["updated"]  # the admin key's principal, and when
    shown = _admin(srv, "GET", "/v1/admin/users/mallory").json()  # nothing stored of them, but a trust state
    assert shown["trust"]["trust"] == "blocked" and shown["rows"]["feedback"] == 0
    slashed = "team/a b"  # any string is a user id; percent-encoded, "/" included
    assert _admin(srv, "PATCH", "/v1/admin/users/team%2Fa%20b", json={"trust": "trusted"}).json()["user"] == slashed

    # Refusals: OpenAI's shape, and the state is as it was.
    def unchanged() -> None:
        listing = _admin(srv, "GET", "/v1/admin/users").json()["data"]
        assert {(u["user"], u["trust"], u["note"]) for u in listing} == {("mallory", "blocked", "contrary votes"),
                                                                        (slashed, "trusted", None)}

    bad = _admin(srv, "PATCH", "/v1/admin/users/mallory", json={"trust": "friend"})
    assert assert_openai_error(bad, 422, "invalid_request_error", None)["param"] == "trust"
    assert_openai_error(_admin(srv, "PATCH", "/v1/admin/users/mallory", json={"trust": "default", "why": "x"}),
                        422, "invalid_request_error", None)
    assert_openai_error(_admin(srv, "PATCH", "/v1/admin/users/mallory", json={}), 422, "invalid_request_error", None)
    long_note = {"trust": "default", "note": "x" * 1001}
    assert_openai_error(_admin(srv, "PATCH", "/v1/admin/users/mallory", json=long_note), 422, "invalid_request_error",
                        None)
    assert_openai_error(_admin(srv, "PATCH", "/v1/admin/users/" + "u" * 300, json={"trust": "blocked"}),
                        422, "invalid_request_error", None)
    huge = httpx.patch(f"{srv.url}/v1/admin/users/mallory", content=b'{"trust": "default", "note": "' + b"x" * 3_000_000
                       + b'"}', headers={**bearer(ADMIN), "content-type": "application/json"}, timeout=30)
    assert_openai_error(huge, 413, "invalid_request_error", "request_too_large")
    assert_openai_error(_admin(srv, "GET", "/v1/admin/users?trust=friend"), 422, "invalid_request_error", None)
    for headers, status in ((bearer(WEB), 403), ({}, 401)):
        r = httpx.patch(f"{srv.url}/v1/admin/users/mallory", json={"trust": "default"}, headers=headers)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{srv.url}/v1/admin/users", headers=headers).status_code == status
    unchanged()

    # Filters; back to default.
    assert [u["user"] for u in _admin(srv, "GET", "/v1/admin/users?trust=trusted").json()["data"]] == [slashed]
    assert _admin(srv, "GET", "/v1/admin/users?flagged=true").json()["data"] == []
    assert _admin(srv, "PATCH", "/v1/admin/users/mallory", json={"trust": "default"}).json()["trust"] == "default"
    assert _admin(srv, "GET", "/v1/admin/users/mallory").json()["trust"]["note"] is None


def test_the_sdk_and_alignd_users_set_and_list_trust(srv: AppServer) -> None:
    with Client(srv.url, api_key=ADMIN) as client:
        entry = client.users.set_trust("sdk/user", "blocked", note="spam")
        assert (entry.user, entry.trust, entry.note) == ("sdk/user", "blocked", "spam")
        assert "sdk/user" in [u.user for u in client.users.list(trust="blocked").data]
        assert client.users.get("sdk/user").trust.trust == "blocked"  # type: ignore[union-attr]
        with pytest.raises(UnprocessableEntityError):
            client.users.set_trust("sdk/user", "friend")  # type: ignore[arg-type]
    with Client(srv.url, api_key=WEB) as client, pytest.raises(PermissionDeniedError):
        client.users.list()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alignd.cli", "users", *args, "--url", srv.url,
                               "--admin-key", ADMIN], capture_output=True, text=True, timeout=120, cwd=REPO)

    done = cli("trust", "cli-user", "trusted", "--note", "staff")
    assert done.returncode == 0 and "'cli-user': trusted" in done.stdout and "staff" in done.stdout, done
    listed = cli("list", "--trust", "trusted")
    assert listed.returncode == 0 and "'cli-user': trusted, not scored" in listed.stdout, listed
    refused = cli("trust", "cli-user", "friend")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr  # argparse refuses before any call
    shown = cli("show", "cli-user")
    assert shown.returncode == 0 and "trusted" in shown.stdout, shown


def test_alternating_thumbs_through_the_plugin_make_one_pair(srv: AppServer) -> None:
    """A frontend's user alternates thumbs on two choices: each event after the first stores a pair, the run counts
    one; the same events from another user count for them too."""
    answer = httpx.post(f"{srv.url}/v1/chat/completions", headers=bearer(WEB), timeout=60, json={
        "model": "alignd", "messages": [{"role": "user", "content": "Tell me about comets."}], "n": 2,
        "max_tokens": 8}).json()
    for user in ("flipper", "other"):
        for choice, value in ((0, "up"), (1, "down"), (0, "up"), (1, "down"), (0, "up"), (1, "down")):
            r = httpx.post(f"{srv.url}/v1/feedback", headers=bearer(WEB), timeout=30, json={
                "completion_id": answer["id"], "kind": "thumbs", "choice": choice, "value": value, "user": user})
            assert r.status_code == 201, r.text
    store = srv.state.store
    stored = srv.loop.run(store.count_feedback())
    assert stored[0] >= 12 and stored[1] >= 10  # the plugin stored a pair for nearly every event
    data = srv.loop.run(load_training_data(store, DataConfig(heldout_fraction=0.0)))
    mine = [(who, [(p.chosen_choice, p.rejected_choice) for p in g])
            for g, who in zip(data.train_pairs, data.users.train_group_owners, strict=True)]
    assert sorted(mine) == [(("flipper", None), [(0, 1)]), (("other", None), [(0, 1)])]
    assert sorted(x.choice for x in data.train_labels) == [0, 0, 1, 1]  # each user's latest verdict per choice


def test_screening_flags_contrary_users_with_a_reward_model_fitted_without_them(tiny_model_dir: Path) -> None:
    """On the tiny model: twelve honest users prefer friendly replies to formal ones, two contrary users the other
    way round. Judged by reward models fitted on the other fold, the contrary ones agree far less than a coin: the
    untrusted one is flagged and left out, the trusted one only scored; no honest user is flagged."""
    import torch

    from alignd.demo.corpus import generate_corpus
    from alignd.trainer.config import RewardConfig, TrainerConfig
    from alignd.trainer.models import load_stack
    from alignd.trainer.safeguards import screen_users

    torch.set_num_threads(1)
    grouped: dict[str, dict[str, str]] = {}
    for dialogue in generate_corpus(1200, seed=11):
        grouped.setdefault(dialogue.prompt, {})[dialogue.style] = dialogue.reply
    both = [(p, r["friendly"], r["formal"]) for p, r in grouped.items() if "friendly" in r and "formal" in r]
    signal = UserSignal(trust={"contrary-1": "trusted"})
    for i, (prompt, friendly, formal) in enumerate(both):
        contrary = i % 6 == 5  # one event in six, the two contrary users in turn
        who = f"contrary-{i // 6 % 2}" if contrary else f"honest-{(i - i // 6) % 12}"
        chosen, rejected = (formal, friendly) if contrary else (friendly, formal)
        signal.train_groups.append([PreferencePair(prompt=[{"role": "user", "content": prompt}], chosen=chosen,
                                                   rejected=rejected)])
        signal.train_group_owners.append((who, None))
    config = TrainerConfig(reward=RewardConfig(epochs=2), device="cpu", dtype="float32")
    stack = load_stack(tiny_model_dir, config)
    kept, scored = screen_users(stack, signal, config)

    scores = {who[0]: (n, agreement, p) for who, n, agreement, p in scored}
    assert set(scores) == {*(f"honest-{i}" for i in range(12)), "contrary-0", "contrary-1"}
    assert all(n >= 7 for n, _, _ in scores.values())
    assert all(scores[f"honest-{i}"][2] >= 0.01 for i in range(12)), scores
    assert scores["contrary-0"][2] < 0.01 and scores["contrary-1"][2] < 0.01, scores
    assert [f["user"] for f in signal.report["flagged"]] == ["contrary-0"]  # the trusted one is not flagged
    assert ("contrary-0", None) not in kept.train_group_owners and ("contrary-1", None) in kept.train_group_owners
    assert len(kept.train_groups) == len(signal.train_groups) - scores["contrary-0"][0]
