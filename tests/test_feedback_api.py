"""Feedback end to end through real HTTP against the real server and engine: each built-in kind (completion →
feedback → stored pairs/labels → export line) on SQLite and PostgreSQL, the export read back with ``datasets``,
idempotency, every bad input, quotas, filters, auth, listing, sinks that fail or hang, the JSONL and webhook sinks,
redaction, plugin routes, blocked and conflicting plugins, entry-point discovery, and concurrent clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from alignd.clients.webhooks import verify
from tests import feedback_plugins
from tests.engine_fixtures import create_pg_database
from tests.serverkit import AppServer

ADMIN = {"authorization": "Bearer admin-key"}
HELLO = [{"role": "user", "content": "How do I bake bread at home?"}]


@pytest.fixture(scope="module")
def fb_sqlite(make_server: Callable[..., AppServer]) -> AppServer:
    return make_server(admin_keys=["admin-key"])


@pytest.fixture(scope="module")
def fb_pg(make_server: Callable[..., AppServer], postgres_server_url: str) -> AppServer:
    return make_server(admin_keys=["admin-key"],
                       database=create_pg_database(postgres_server_url, f"feedback_{uuid.uuid4().hex[:8]}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def fb(request: pytest.FixtureRequest) -> AppServer:
    """The feedback server on each database."""
    return request.getfixturevalue("fb_sqlite" if request.param == "sqlite" else "fb_pg")


def complete(srv: AppServer, n: int = 2, **body: Any) -> tuple[str, list[str]]:
    """A real completion with ``n`` choices: its id and the choices' texts."""
    body = {"model": "alignd", "messages": HELLO, "n": n, "max_tokens": 8, "temperature": 1.0, **body}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["id"], [c["message"]["content"] for c in r.json()["choices"]]


def send(srv: AppServer, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/feedback", json=body, headers=headers, timeout=60)


def export(srv: AppServer, fmt: str, completion_id: str | None = None, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(f"{srv.url}/v1/feedback/export", params={"format": fmt, **params}, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    return [line for line in lines if completion_id is None or line["completion_id"] == completion_id]


def counts(srv: AppServer) -> tuple[int, int, int]:
    return srv.loop.run(srv.state.store.count_feedback())


def metric(srv: AppServer, name: str) -> float:
    for line in httpx.get(f"{srv.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return 0.0


def wait_for(condition: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# --- each kind end to end ----------------------------------------------------------------------------------------


def test_thumbs_end_to_end(fb: AppServer) -> None:
    cid, texts = complete(fb, n=2)
    up = send(fb, completion_id=cid, kind="thumbs", choice=0, value="up", comment="nice", tags=["bread"])
    assert up.status_code == 201, up.text
    assert up.json()["id"].startswith("fb-") and (up.json()["pairs"], up.json()["labels"]) == (0, 1)
    down = send(fb, completion_id=cid, kind="thumbs", choice=1, value="down")
    assert (down.json()["pairs"], down.json()["labels"]) == (1, 1)

    [pair] = export(fb, "preferences", cid)
    assert pair["prompt"] == HELLO and pair["chosen"] == assistant(texts[0]) and pair["rejected"] == assistant(texts[1])
    assert (pair["kind"], pair["feedback_id"], pair["policy_version"]) == ("thumbs", down.json()["id"], 0)
    kto = export(fb, "kto", cid)
    assert [(k["completion"], k["label"]) for k in kto] == [(assistant(texts[0]), True), (assistant(texts[1]), False)]
    events = export(fb, "events", cid)
    assert [e["id"] for e in events] == [up.json()["id"], down.json()["id"]]
    assert events[0]["comment"] == "nice" and events[0]["tags"] == ["bread"] and events[0]["choices"] == texts


def test_ranking_end_to_end(fb: AppServer) -> None:
    cid, texts = complete(fb, n=3)
    r = send(fb, completion_id=cid, kind="ranking", ranking=[2, 0, 1])
    assert r.status_code == 201 and (r.json()["pairs"], r.json()["labels"]) == (3, 0), r.text
    lines = export(fb, "preferences", cid)
    assert [(p["chosen_choice"], p["rejected_choice"]) for p in lines] == [(2, 0), (2, 1), (0, 1)]
    assert [p["chosen"] for p in lines] == [assistant(texts[2])] * 2 + [assistant(texts[0])]
    assert all(p["weight"] == pytest.approx(1 / 3) for p in lines)


def test_pairwise_end_to_end(fb: AppServer) -> None:
    cid, texts = complete(fb, n=2)
    won = send(fb, completion_id=cid, kind="pairwise", winner=1)
    tie = send(fb, completion_id=cid, kind="pairwise", winner="tie")
    both_bad = send(fb, completion_id=cid, kind="pairwise", winner="both_bad", choices=[1, 0])
    assert [(r.status_code, r.json()["pairs"], r.json()["labels"]) for r in (won, tie, both_bad)] == [
        (201, 1, 0), (201, 0, 0), (201, 0, 2)]
    [pair] = export(fb, "preferences", cid)
    assert pair["chosen"] == assistant(texts[1]) and pair["rejected"] == assistant(texts[0])
    events = export(fb, "events", cid)
    assert [e["payload"]["winner"] for e in events] == [1, "tie", "both_bad"], "ties are stored and exported"
    assert [k["label"] for k in export(fb, "kto", cid)] == [False, False]


def test_rating_end_to_end(fb: AppServer) -> None:
    cid, texts = complete(fb, n=2)
    first = send(fb, completion_id=cid, kind="rating", choice=0, score=9)
    second = send(fb, completion_id=cid, kind="rating", choice=1, score=4)
    assert [(r.json()["pairs"], r.json()["labels"]) for r in (first, second)] == [(0, 1), (1, 0)]
    [pair] = export(fb, "preferences", cid)
    assert pair["chosen"] == assistant(texts[0]) and pair["margin"] == pytest.approx(5 / 9)
    [label] = export(fb, "kto", cid)
    assert label["label"] is True and label["choice"] == 0


def test_edit_end_to_end(fb: AppServer) -> None:
    cid, texts = complete(fb, n=1)
    edited = "Mix flour, water, salt and yeast; knead, let it rise, bake at 230 C."
    r = send(fb, completion_id=cid, kind="edit", text=edited)
    assert r.status_code == 201 and r.json()["pairs"] == 1, r.text
    [pair] = export(fb, "preferences", cid)
    assert pair["chosen"] == assistant(edited) and pair["rejected"] == assistant(texts[0])
    assert pair["chosen_choice"] is None and pair["rejected_choice"] == 0


def test_entry_point_plugin_kind_end_to_end(fb_sqlite: AppServer) -> None:
    """The example package in tests/plugin_example arrives through its entry point like any installed plugin."""
    assert "entry point" in fb_sqlite.state.plugins.origins["unsafe"]
    cid, texts = complete(fb_sqlite, n=2)
    r = send(fb_sqlite, completion_id=cid, kind="unsafe", choice=1, category="harmful")
    assert r.status_code == 201 and r.json()["labels"] == 1, r.text
    [label] = export(fb_sqlite, "kto", cid)
    assert (label["label"], label["weight"], label["completion"]) == (False, 2.0, assistant(texts[1]))
    bad = send(fb_sqlite, completion_id=cid, kind="unsafe", category="rude")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "category"


def test_export_reads_back_with_datasets_as_trl_expects(fb_sqlite: AppServer, tmp_path: Path) -> None:
    from datasets import load_dataset

    cid, _ = complete(fb_sqlite, n=3)
    assert send(fb_sqlite, completion_id=cid, kind="ranking", ranking=[1, 2, 0]).status_code == 201
    assert send(fb_sqlite, completion_id=cid, kind="rating", choice=0, score=2).status_code == 201
    for fmt in ("preferences", "kto"):
        r = httpx.get(f"{fb_sqlite.url}/v1/feedback/export", params={"format": fmt}, headers=ADMIN, timeout=60)
        (tmp_path / f"{fmt}.jsonl").write_bytes(r.content)
    prefs = load_dataset("json", data_files=str(tmp_path / "preferences.jsonl"), split="train",
                         cache_dir=str(tmp_path / "cache"))
    assert {"prompt", "chosen", "rejected", "margin"} <= set(prefs.column_names)  # RewardTrainer / DPOTrainer
    mine = prefs.filter(lambda row: row["completion_id"] == cid)
    assert mine.num_rows == 3
    row = mine[0]
    assert row["prompt"] == HELLO and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert isinstance(row["margin"], float)
    kto = load_dataset("json", data_files=str(tmp_path / "kto.jsonl"), split="train", cache_dir=str(tmp_path / "c2"))
    assert {"prompt", "completion", "label"} <= set(kto.column_names)
    assert kto.filter(lambda row: row["completion_id"] == cid)["label"] == [False]


def test_export_filters_by_time_and_policy(fb_sqlite: AppServer) -> None:
    cid, _ = complete(fb_sqlite, n=2)
    first = send(fb_sqlite, completion_id=cid, kind="pairwise", winner=0).json()
    time.sleep(0.01)
    second = send(fb_sqlite, completion_id=cid, kind="pairwise", winner=1).json()
    later = export(fb_sqlite, "preferences", cid, since=second["created"])
    assert [p["feedback_id"] for p in later] == [second["id"]]
    assert len(export(fb_sqlite, "events", cid, since=first["created"])) == 2
    assert export(fb_sqlite, "preferences", cid, policy=7) == []
    assert len(export(fb_sqlite, "preferences", cid, policy=0)) == 2
    bad = httpx.get(f"{fb_sqlite.url}/v1/feedback/export", params={"format": "csv"}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "format"


# --- idempotency -------------------------------------------------------------------------------------------------


def test_idempotency_key_replays_or_conflicts(fb: AppServer) -> None:
    cid, _ = complete(fb, n=2)
    key = uuid.uuid4().hex
    body = {"completion_id": cid, "kind": "thumbs", "value": "up", "idempotency_key": key}
    first = send(fb, **body)
    before = counts(fb)
    again = send(fb, **body)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    header = send(fb, headers={"Idempotency-Key": key}, completion_id=cid, kind="thumbs", value="up")
    assert header.json()["id"] == first.json()["id"], "the header and the body field are the same key"
    conflict = send(fb, **{**body, "value": "down"})
    assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "idempotency_key"
    assert counts(fb) == before, "a replay or a conflict stores nothing"
    fresh = send(fb, headers={"Idempotency-Key": uuid.uuid4().hex}, completion_id=cid, kind="thumbs", value="up")
    assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]


def test_concurrent_retries_with_one_key_store_one_event(fb: AppServer) -> None:
    cid, _ = complete(fb, n=1)
    body = {"completion_id": cid, "kind": "rating", "score": 7, "idempotency_key": uuid.uuid4().hex}
    before = counts(fb)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: send(fb, **body), range(8)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert counts(fb)[0] == before[0] + 1


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def completions(fb_sqlite: AppServer) -> dict[str, tuple[str, list[str]]]:
    return {"one": complete(fb_sqlite, n=1), "three": complete(fb_sqlite, n=3)}


BAD_FEEDBACK: list[tuple[str, Any, int, str | None]] = [
    # (case, body (bytes, or a dict whose "{one}"/"{three}" become completion ids), status, param)
    ("malformed json", b'{"completion_id": ', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("empty body", b"", 400, None),
    ("completion_id missing", {"kind": "thumbs", "value": "up"}, 422, "completion_id"),
    ("kind missing", {"completion_id": "{one}", "value": "up"}, 422, "kind"),
    ("unknown kind", {"completion_id": "{one}", "kind": "stars", "value": 5}, 422, "kind"),
    ("unknown completion", {"completion_id": "chatcmpl-nope", "kind": "thumbs", "value": "up"}, 404, "completion_id"),
    ("field of another kind", {"completion_id": "{one}", "kind": "thumbs", "value": "up", "score": 3}, 422, "score"),
    ("thumbs value missing", {"completion_id": "{one}", "kind": "thumbs"}, 422, "value"),
    ("thumbs value invalid", {"completion_id": "{one}", "kind": "thumbs", "value": "meh"}, 422, "value"),
    ("thumbs choice out of range", {"completion_id": "{three}", "kind": "thumbs", "value": "up", "choice": 3}, 422,
     "choice"),
    ("thumbs choice negative", {"completion_id": "{three}", "kind": "thumbs", "value": "up", "choice": -1}, 422,
     "choice"),
    ("ranking not distinct", {"completion_id": "{three}", "kind": "ranking", "ranking": [0, 1, 0]}, 422, "ranking"),
    ("ranking out of range", {"completion_id": "{three}", "kind": "ranking", "ranking": [0, 5]}, 422, "ranking"),
    ("ranking empty", {"completion_id": "{three}", "kind": "ranking", "ranking": []}, 422, "ranking"),
    ("ranking of one choice", {"completion_id": "{one}", "kind": "ranking", "ranking": [0]}, 422, "ranking"),
    ("pairwise on one choice", {"completion_id": "{one}", "kind": "pairwise", "winner": 0}, 422, "choices"),
    ("pairwise winner not compared", {"completion_id": "{three}", "kind": "pairwise", "winner": 2}, 422, "winner"),
    ("pairwise winner invalid", {"completion_id": "{three}", "kind": "pairwise", "winner": "left"}, 422, "winner"),
    ("pairwise same choice twice", {"completion_id": "{three}", "kind": "pairwise", "winner": 1,
                                    "choices": [1, 1]}, 422, "choices"),
    ("score below 1", {"completion_id": "{one}", "kind": "rating", "score": 0}, 422, "score"),
    ("score above 10", {"completion_id": "{one}", "kind": "rating", "score": 11}, 422, "score"),
    ("score not a number", {"completion_id": "{one}", "kind": "rating", "score": "7"}, 422, "score"),
    ("edit empty", {"completion_id": "{one}", "kind": "edit", "text": ""}, 422, "text"),
    ("edit blank", {"completion_id": "{one}", "kind": "edit", "text": "  \n "}, 422, "text"),
    ("edit unchanged", {"completion_id": "{one}", "kind": "edit", "text": "{one_text}"}, 422, "text"),
    ("tags wrong type", {"completion_id": "{one}", "kind": "thumbs", "value": "up", "tags": "x"}, 422, "tags"),
    ("comment too long", {"completion_id": "{one}", "kind": "thumbs", "value": "up", "comment": "x" * 10_001}, 422,
     "comment"),
    ("body too large", {"completion_id": "{one}", "kind": "edit", "text": "x" * 2_000_000}, 413, None),
]


def _fill(value: Any, completions: dict[str, tuple[str, list[str]]]) -> Any:
    if isinstance(value, str):
        return {"{one}": completions["one"][0], "{three}": completions["three"][0],
                "{one_text}": completions["one"][1][0] + " "}.get(value, value)
    return value


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_FEEDBACK, ids=[c[0] for c in BAD_FEEDBACK])
def test_bad_feedback_is_a_clear_error_and_stores_nothing(fb_sqlite: AppServer, completions: Any, case: str,
                                                          body: Any, status: int, param: str | None) -> None:
    before = counts(fb_sqlite)
    content = body if isinstance(body, bytes) else json.dumps({k: _fill(v, completions) for k, v in body.items()})
    r = httpx.post(f"{fb_sqlite.url}/v1/feedback", content=content, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert counts(fb_sqlite) == before


def test_header_and_body_keys_must_agree(fb_sqlite: AppServer, completions: Any) -> None:
    r = send(fb_sqlite, headers={"Idempotency-Key": "a"}, completion_id=completions["one"][0], kind="thumbs",
             value="up", idempotency_key="b")
    assert r.status_code == 422 and r.json()["error"]["param"] == "idempotency_key"


def test_rejections_are_counted(fb_sqlite: AppServer, completions: Any) -> None:
    before = metric(fb_sqlite, 'alignd_feedback_rejected_total{reason="invalid_feedback"}')
    send(fb_sqlite, completion_id=completions["three"][0], kind="ranking", ranking=[1, 1])
    assert metric(fb_sqlite, 'alignd_feedback_rejected_total{reason="invalid_feedback"}') == before + 1


# --- quotas, filters, auth, listing ------------------------------------------------------------------------------


def test_quota_answers_429_with_retry_after(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(plugins={"feedback_per_minute": 2})
    cid, _ = complete(srv, n=1)
    statuses = [send(srv, completion_id=cid, kind="thumbs", value="up", user="bob") for _ in range(3)]
    assert [r.status_code for r in statuses] == [201, 201, 429]
    error = statuses[-1].json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "quota_exceeded"
    assert int(statuses[-1].headers["retry-after"]) >= 1
    assert send(srv, completion_id=cid, kind="thumbs", value="up", user="carol").status_code == 201
    assert counts(srv)[0] == 3
    assert metric(srv, 'alignd_feedback_rejected_total{reason="quota_exceeded"}') == 1


def test_filter_plugin_rejects_before_storage(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(plugins={"plugin_modules": ["tests.feedback_plugins:spam_filter"]})
    cid, _ = complete(srv, n=1)
    r = send(srv, completion_id=cid, kind="thumbs", value="up", comment="BUY NOW at example.shop")
    assert r.status_code == 422 and r.json()["error"]["code"] == "spam" and r.json()["error"]["param"] == "comment"
    assert counts(srv) == (0, 0, 0)
    assert send(srv, completion_id=cid, kind="thumbs", value="up", comment="tasty").status_code == 201


def test_keys_guard_feedback_and_operator_endpoints(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(api_keys=["user-key"], admin_keys=["admin-key"])
    cid, _ = complete_with_key(srv, "user-key")
    body = {"completion_id": cid, "kind": "thumbs", "value": "up"}
    assert send(srv, **body).status_code == 401
    assert send(srv, headers={"authorization": "Bearer wrong"}, **body).status_code == 401
    assert send(srv, headers={"authorization": "Bearer user-key"}, **body).status_code == 201
    for path in ("/v1/feedback", "/v1/feedback/export"):
        assert httpx.get(f"{srv.url}{path}").status_code == 401
        user = httpx.get(f"{srv.url}{path}", headers={"authorization": "Bearer user-key"})
        assert user.status_code == 403 and user.json()["error"]["type"] == "permission_error"
        assert httpx.get(f"{srv.url}{path}", headers=ADMIN).status_code == 200


def complete_with_key(srv: AppServer, key: str) -> tuple[str, list[str]]:
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": "alignd", "messages": HELLO, "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()["id"], [r.json()["choices"][0]["message"]["content"]]


def test_operator_endpoints_refused_without_admin_keys(server: AppServer) -> None:
    r = httpx.get(f"{server.url}/v1/feedback")
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_listing_filters_and_pages(fb_sqlite: AppServer) -> None:
    cid, _ = complete(fb_sqlite, n=2)
    ids = [send(fb_sqlite, completion_id=cid, kind="thumbs", value="up", choice=i % 2, user=f"lister-{i % 2}")
           .json()["id"] for i in range(5)]
    page = httpx.get(f"{fb_sqlite.url}/v1/feedback", params={"completion_id": cid, "limit": 2}, headers=ADMIN).json()
    assert page["object"] == "list" and page["has_more"] and [e["id"] for e in page["data"]] == ids[:2]
    seen = [e["id"] for e in page["data"]]
    while page["has_more"]:
        page = httpx.get(f"{fb_sqlite.url}/v1/feedback", headers=ADMIN,
                         params={"completion_id": cid, "limit": 2, "after": page["last_id"]}).json()
        seen += [e["id"] for e in page["data"]]
    assert seen == ids
    mine = httpx.get(f"{fb_sqlite.url}/v1/feedback", headers=ADMIN,
                     params={"user": "lister-1", "completion_id": cid, "kind": "thumbs"}).json()["data"]
    assert [e["id"] for e in mine] == [ids[1], ids[3]] and mine[0]["payload"] == {"value": "up", "choice": 1}
    for params, param in (({"limit": 0}, "limit"), ({"since": "yesterday"}, "since"), ({"colour": "red"}, "colour")):
        r = httpx.get(f"{fb_sqlite.url}/v1/feedback", params=params, headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_feedback_is_taken_while_the_engine_loads(make_server: Callable[..., AppServer]) -> None:
    srv = make_server()
    cid, _ = complete(srv, n=1)
    chat = srv.state.chat
    srv.state.chat = None  # what the app looks like before the engine is up
    try:
        assert httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "alignd", "messages": HELLO}).status_code \
            == 503
        assert send(srv, completion_id=cid, kind="thumbs", value="down").status_code == 201
    finally:
        srv.state.chat = chat


def test_pii_is_redacted_before_storage(fb_sqlite: AppServer) -> None:
    cid, _ = complete(fb_sqlite, n=1)
    r = send(fb_sqlite, completion_id=cid, kind="edit", text="Ask baker.jo@example.com or call +44 20 7946 0958.",
             comment="I am jo@example.org, 555-123-4567")
    assert r.status_code == 201, r.text
    [event] = export(fb_sqlite, "events", cid)
    assert event["comment"] == "I am [email], [phone]"
    assert event["payload"]["text"] == "Ask [email] or call [phone]."
    [pair] = export(fb_sqlite, "preferences", cid)
    assert pair["chosen"] == assistant("Ask [email] or call [phone].")


# --- sinks -------------------------------------------------------------------------------------------------------


@pytest.fixture
def sink_server(make_server: Callable[..., AppServer]) -> AppServer:
    return make_server(plugins={"sink_timeout_s": 2.0})


def test_failing_and_hanging_sinks_never_fail_the_request(sink_server: AppServer) -> None:
    srv = sink_server
    recorder, blocking = feedback_plugins.Recorder(), feedback_plugins.BlockingSink()
    plugins = {"failing": feedback_plugins.FailingSink(), "hanging": feedback_plugins.HangingSink(),
               "blocking": blocking, "recorder": recorder}
    for name, plugin in plugins.items():
        srv.state.plugins.register(plugin, name=name)
    try:
        cid, _ = complete(srv, n=2)
        started = time.perf_counter()
        r = send(srv, completion_id=cid, kind="thumbs", value="up")
        assert r.status_code == 201 and time.perf_counter() - started < 1.5, "sinks run after the answer"
        assert srv.loop.run(srv.state.store.list_feedback(completion_id=cid, kind="thumbs"))[0].id == r.json()["id"]
        wait_for(lambda: recorder.seen)
        assert recorder.seen == [(r.json()["id"], 0, 1)]
        wait_for(lambda: metric(srv, 'alignd_sink_timeouts_total{plugin="hanging"}') >= 1)
        wait_for(lambda: metric(srv, 'alignd_sink_timeouts_total{plugin="blocking"}') >= 1)
        assert metric(srv, 'alignd_sink_failures_total{plugin="failing"}') == 1
        second = send(srv, completion_id=cid, kind="thumbs", value="down", choice=1)
        assert second.status_code == 201 and second.json()["pairs"] == 1
        wait_for(lambda: len(recorder.seen) == 2)
    finally:
        blocking.release.set()
        for name in plugins:
            srv.state.plugins.unregister(name=name)


def test_jsonl_sink_appends_and_rotates(make_server: Callable[..., AppServer], tmp_path: Path) -> None:
    path = tmp_path / "feedback" / "events.jsonl"
    srv = make_server(plugins={"jsonl_path": str(path), "jsonl_max_bytes": 2048, "jsonl_backups": 20})
    cid, _ = complete(srv, n=2)
    ids = [send(srv, completion_id=cid, kind="rating", score=1 + i, choice=i % 2).json()["id"] for i in range(8)]

    def written() -> list[dict[str, Any]]:
        # Oldest first: events.jsonl.<highest> … events.jsonl.1, then events.jsonl.
        files = sorted(path.parent.glob("events.jsonl*"), reverse=True,
                       key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        return [json.loads(line) for f in files for line in f.read_text().splitlines()]

    lines = wait_for(lambda: (w := written()) and len(w) == len(ids) and w)
    assert [line["id"] for line in lines] == ids, "every event once, in commit order across rotated files"
    assert (path.parent / "events.jsonl.1").exists() and all(p.stat().st_size <= 2048 for p in path.parent.iterdir())
    assert lines[1]["kind"] == "rating" and lines[1]["payload"] == {"score": 2, "choice": 1}


class _Receiver(BaseHTTPRequestHandler):
    """A webhook receiver answering the scripted ``statuses`` (then 200) and keeping what it received."""

    statuses: ClassVar[list[int]]
    received: ClassVar[list[tuple[dict[str, str], bytes]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((dict(self.headers), body))
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"statuses": [], "received": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", handler
    httpd.shutdown()


def test_webhook_posts_signed_events_with_retries(make_server: Callable[..., AppServer],
                                                  receiver: tuple[str, type[_Receiver]]) -> None:
    url, handler = receiver
    handler.statuses = [503, 500]  # the first event needs two retries
    srv = make_server(plugins={"webhook_url": url, "webhook_secret": "s3cret", "webhook_backoff_s": 0.05,
                               "webhook_retries": 3})
    cid, _ = complete(srv, n=2)
    ids = [send(srv, completion_id=cid, kind="pairwise", winner=i % 2).json()["id"] for i in range(3)]
    wait_for(lambda: len(handler.received) == 5)
    delivered = [json.loads(body)["id"] for _, body in handler.received]
    assert delivered == [ids[0], ids[0], ids[0], ids[1], ids[2]]
    for headers, body in handler.received:  # every attempt signed with its own timestamp
        verify(body, headers, "s3cret")
        assert "X-Alignd-Signature" not in headers  # the old, replayable signature is off by default
    assert json.loads(handler.received[-1][1])["pairs"] == 1

    handler.statuses = [500] * 4  # retries exhausted: counted, and the event stays stored
    lost = send(srv, completion_id=cid, kind="pairwise", winner="tie").json()["id"]
    wait_for(lambda: metric(srv, 'alignd_sink_failures_total{plugin="webhook"}') == 1)
    assert any(e.id == lost for e in srv.loop.run(srv.state.store.list_feedback(completion_id=cid, kind="pairwise")))


# --- plugins: routes, blocking, conflicts ------------------------------------------------------------------------


def test_plugin_route_turns_reactions_into_feedback(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(api_keys=["user-key"], plugins={"plugin_modules": ["tests.feedback_plugins:reactions"]})
    cid, _ = complete_with_key(srv, "user-key")
    url = f"{srv.url}/v1/plugins/reactions/reaction"
    assert httpx.post(url, json={"completion_id": cid, "emoji": "+1"}).status_code == 401
    r = httpx.post(url, json={"completion_id": cid, "emoji": "+1"},
                   headers={"x-reaction-token": feedback_plugins.Reactions.TOKEN})
    assert r.status_code == 201, r.text
    [stored] = srv.loop.run(srv.state.store.list_feedback(completion_id=cid, kind="thumbs"))
    assert stored.id == r.json()["feedback_id"] and stored.tags == ["reaction"]
    assert srv.state.feedback.context.state["reactions"]["started"] > 0
    # The handler that reaches the service through request.app.state (the first documented way) still stores it.
    other, _ = complete_with_key(srv, "user-key")
    r = httpx.post(f"{url}-via-state", json={"completion_id": other, "emoji": "-1"},
                   headers={"x-reaction-token": feedback_plugins.Reactions.TOKEN})
    assert r.status_code == 201, r.text
    [stored] = srv.loop.run(srv.state.store.list_feedback(completion_id=other, kind="thumbs"))
    assert stored.id == r.json()["feedback_id"] and stored.payload["value"] == "down"


def test_blocked_plugin_is_not_loaded(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(plugins={"block_plugins": ["rating", "pii_redact"]})
    assert srv.state.plugins.get_plugin("rating") is None and srv.state.plugins.is_blocked("rating")
    cid, _ = complete(srv, n=1)
    r = send(srv, completion_id=cid, kind="rating", score=5)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_kind"
    assert send(srv, completion_id=cid, kind="thumbs", value="up", comment="me@example.com").status_code == 201
    [event] = srv.loop.run(srv.state.store.list_feedback(completion_id=cid, kind="thumbs"))
    assert event.comment == "me@example.com", "pii_redact is blocked"


def test_duplicate_kind_stops_the_server_from_starting(tmp_path: Path) -> None:
    """``alignd serve`` exits at start, naming both plugins, before it opens the store or loads a model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    done = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "serve", "--model", str(tmp_path / "no-model"), "--data-dir",
         str(tmp_path), "--port", "0", "--plugin-module", "tests.feedback_plugins:duplicate_thumbs"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent, env=env)
    assert done.returncode != 0
    assert "'thumbs' is registered by both plugin 'duplicate_thumbs' and plugin 'thumbs'" in done.stderr
    assert not (tmp_path / "alignd.db").exists()


# --- many clients ------------------------------------------------------------------------------------------------


def test_concurrent_feedback_from_many_clients_loses_nothing(fb: AppServer) -> None:
    targets = [complete(fb, n=2)[0] for _ in range(4)]
    before = counts(fb)
    total = 240

    def client(worker: int) -> list[httpx.Response]:
        with httpx.Client(timeout=60) as http:
            return [http.post(f"{fb.url}/v1/feedback", json={
                "completion_id": targets[i % len(targets)], "kind": "thumbs", "choice": i % 2,
                "value": "up" if (i // 2) % 2 else "down", "user": f"client-{worker}"})
                for i in range(worker, total, 24)]

    with ThreadPoolExecutor(24) as pool:
        responses = [r for batch in pool.map(client, range(24)) for r in batch]
    assert len(responses) == total and {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == total
    after = counts(fb)
    assert after[0] - before[0] == total
    assert after[1] - before[1] == sum(r.json()["pairs"] for r in responses)
    assert after[2] - before[2] == total  # one label per thumb
    assert sum(len(export(fb, "events", cid)) for cid in targets) == total
