"""The admin endpoints behind the operator dashboard, over HTTP against the real server, on SQLite and PostgreSQL:
``GET /v1/feedback/stats`` (feedback volume by kind per hour or day) and ``GET /v1/plugins``. The store query under
the stats is tested around midnight and in a non-UTC session time zone in ``tests/test_feedback_stats.py``."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest

from tests.engine_fixtures import create_pg_database
from tests.serverkit import AppServer

ADMIN_KEY = "admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def stats_sqlite(make_server: Callable[..., AppServer]) -> AppServer:
    return make_server(admin_keys=[ADMIN_KEY], api_keys=["user-key"])


@pytest.fixture(scope="module")
def stats_pg(make_server: Callable[..., AppServer], postgres_server_url: str) -> AppServer:
    return make_server(admin_keys=[ADMIN_KEY], api_keys=["user-key"],
                       database=create_pg_database(postgres_server_url, f"web_stats_{uuid.uuid4().hex[:8]}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def stats_server(request: pytest.FixtureRequest) -> AppServer:
    """A server with an empty store on each database, so that counts are exact."""
    return request.getfixturevalue("stats_sqlite" if request.param == "sqlite" else "stats_pg")


def test_feedback_stats_endpoint(stats_server: AppServer) -> None:
    user = {"authorization": "Bearer user-key"}
    r = httpx.post(f"{stats_server.url}/v1/chat/completions", headers=user, timeout=120, json={
        "model": "alignd", "messages": [{"role": "user", "content": "Hi!"}], "n": 2, "max_tokens": 8,
        "temperature": 1.0})
    assert r.status_code == 200, r.text
    cid = r.json()["id"]
    created = []
    for body in ({"kind": "thumbs", "value": "up"}, {"kind": "thumbs", "value": "down", "choice": 1},
                 {"kind": "rating", "score": 9}, {"kind": "pairwise", "winner": "tie"}):
        fb = httpx.post(f"{stats_server.url}/v1/feedback", headers=user, json={"completion_id": cid, **body})
        assert fb.status_code == 201, fb.text
        created.append(datetime.fromisoformat(fb.json()["created"]))

    def stats(**params: str) -> httpx.Response:
        return httpx.get(f"{stats_server.url}/v1/feedback/stats", params=params, headers=ADMIN, timeout=30)

    for bucket in ("hour", "day"):
        body = stats(bucket=bucket).json()
        starts = {moment.replace(minute=0, second=0, microsecond=0, **({"hour": 0} if bucket == "day" else {}))
                  for moment in created}
        assert body["object"] == "feedback.stats" and body["bucket"] == bucket
        assert body["kinds"] == ["pairwise", "rating", "thumbs"]
        assert body["totals"] == {"thumbs": 2, "rating": 1, "pairwise": 1}
        assert sum(b["total"] for b in body["data"]) == 4
        assert {datetime.fromisoformat(b["start"]) for b in body["data"]} == starts
        assert datetime.fromisoformat(body["since"]) <= min(starts)
    assert stats().json()["bucket"] == "hour"
    # ``since`` (naive means UTC) is rounded down to its bucket; later than every event: nothing.
    first = min(created)
    body = stats(bucket="day", since=first.astimezone(UTC).replace(tzinfo=None).isoformat()).json()
    assert datetime.fromisoformat(body["since"]) == first.replace(hour=0, minute=0, second=0, microsecond=0)
    assert body["totals"]["thumbs"] == 2
    future = stats(since=datetime(2999, 1, 1, tzinfo=UTC).isoformat()).json()
    assert (future["data"], future["totals"], future["kinds"]) == ([], {}, [])

    bad = stats(bucket="week")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "bucket"
    assert stats(limit="3").status_code == 422
    assert stats(since="yesterday").json()["error"]["param"] == "since"
    assert httpx.get(f"{stats_server.url}/v1/feedback/stats").status_code == 401
    assert httpx.get(f"{stats_server.url}/v1/feedback/stats", headers=user).status_code == 403


def test_plugins_endpoint(stats_sqlite: AppServer, make_server: Callable[..., AppServer]) -> None:
    r = httpx.get(f"{stats_sqlite.url}/v1/plugins", headers=ADMIN)
    assert r.status_code == 200 and r.json()["object"] == "list"
    plugins = {p["name"]: p for p in r.json()["data"]}
    for kind in ("thumbs", "ranking", "pairwise", "rating", "edit"):
        assert plugins[kind]["kinds"] == [kind] and plugins[kind]["status"] == "loaded"
        assert plugins[kind]["origin"] == "built-in" and "register_feedback_kinds" in plugins[kind]["hooks"]
    assert plugins["jsonl_sink"]["kinds"] == [] and "on_feedback" in plugins["jsonl_sink"]["hooks"]
    assert httpx.get(f"{stats_sqlite.url}/v1/plugins").status_code == 401
    assert httpx.get(f"{stats_sqlite.url}/v1/plugins", headers={"authorization": "Bearer user-key"}).status_code == 403

    blocked = make_server(admin_keys=[ADMIN_KEY], plugins={"block_plugins": ["webhook"]})
    listed = {p["name"]: p for p in httpx.get(f"{blocked.url}/v1/plugins", headers=ADMIN).json()["data"]}
    assert (listed["webhook"]["status"], listed["webhook"]["hooks"]) == ("blocked", [])
