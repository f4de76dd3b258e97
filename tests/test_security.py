"""Safe by default, through real HTTP against the real engine: an open non-loopback bind refuses to start, bodies are
JSON only, Host headers are checked, one body limit covers plugin routes, /metrics and /schema take a key, /ready
tells no exception text, and per-caller chat limits (429 with Retry-After) keep one key from starving another.
Every refusal is an OpenAI-shaped 4xx that stores nothing and reaches no engine."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from alignd.limits import key_caller
from tests import feedback_plugins
from tests.serverkit import AppServer
from tests.store_reads import count_completions

HELLO = [{"role": "user", "content": "How do I bake bread at home?"}]
USER, OTHER, ADMIN = "user-key", "other-key", "admin-key"
REPO = Path(__file__).resolve().parent.parent


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def stored(srv: AppServer) -> int:
    return srv.loop.run(count_completions(srv.state.store))


def engine_calls(srv: AppServer) -> float:
    return srv.state.metrics.engine_requests._value.get()


def assert_openai_error(r: httpx.Response, status: int, type_: str, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == type_ and error["code"] == code
    return error


class Unchanged:
    """Asserts that what runs inside stores no completion and hands nothing to the engine."""

    def __init__(self, srv: AppServer) -> None:
        self.srv = srv

    def __enter__(self) -> Unchanged:
        self.before = (stored(self.srv), engine_calls(self.srv))
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert (stored(self.srv), engine_calls(self.srv)) == self.before, "a refused request changed something"


@pytest.fixture(scope="module")
def guarded(make_server: Callable[..., AppServer]) -> AppServer:
    """Keys set, a plugin with a route of its own (auth 'none': it checks a token itself), a small body limit."""
    return make_server(api_keys=[USER, OTHER], admin_keys=[ADMIN], max_body_bytes=8192,
                       plugins={"plugin_modules": ["tests.feedback_plugins:reactions"]})


# --- start-up ----------------------------------------------------------------------------------------------------


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 90) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "alignd.cli", "serve", "--data-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**clean, **(env or {})})
    return done, time.monotonic() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_open_non_loopback_bind_refuses_to_start_before_loading_anything(demo_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    port = str(_free_port())
    # A servable model: without the refusal this would load the engine and listen on every interface (and the
    # subprocess timeout would fail the test).
    done, took = _serve(tmp_path, "--model", str(demo_model_dir), "--host", "0.0.0.0", "--port", port)
    assert done.returncode == 2, done.stderr
    assert "--insecure-open" in done.stderr and "--api-key" in done.stderr and "0.0.0.0" in done.stderr
    assert took < 60, f"the refusal must come before the engine loads (took {took:.0f} s)"
    assert not (tmp_path / "alignd.db").exists() and not (tmp_path / "models").exists()
    for host in ("::", "192.0.2.1", "example.com"):
        done, _ = _serve(tmp_path, "--model", str(demo_model_dir), "--host", host, "--port", port)
        assert done.returncode == 2 and "--insecure-open" in done.stderr, (host, done.stderr)

    # What lets the start go on: a key (flag or environment), --insecure-open, or a loopback address. A missing model
    # then stops it a step later, with a different message: proof that the bind check passed, without an engine.
    missing = str(tmp_path / "no-such-model")
    for args, env in ((["--host", "0.0.0.0", "--insecure-open"], None),
                      (["--host", "0.0.0.0"], {"ALIGND_INSECURE_OPEN": "true"}),
                      (["--host", "0.0.0.0", "--api-key", "k"], None),
                      (["--host", "0.0.0.0"], {"ALIGND_API_KEY": "k1,k2"}),
                      (["--host", "127.0.0.1"], None), (["--host", "localhost"], None), (["--host", "::1"], None)):
        done, _ = _serve(tmp_path, "--model", missing, "--port", port, *args, env=env)
        assert done.returncode == 2 and "does not exist" in done.stderr, (args, env, done.stderr)
        assert "--insecure-open" not in done.stderr, (args, env)


# --- JSON bodies only --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_body_that_is_not_json_is_refused_415(server: AppServer, content_type: str | None) -> None:
    """The no-key server: a cross-site form or text/plain POST (no CORS preflight) must not reach chat or feedback."""
    body = json.dumps({"model": "alignd", "messages": HELLO, "max_tokens": 4}).encode()
    headers = {"content-type": content_type} if content_type else {}
    with Unchanged(server):
        for path in ("/v1/chat/completions", "/v1/feedback"):
            r = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30)
            assert_openai_error(r, 415, "invalid_request_error", "unsupported_media_type")


def test_json_with_parameters_is_accepted_and_bodiless_posts_need_no_type(guarded: AppServer) -> None:
    body = json.dumps({"model": "alignd", "messages": HELLO, "max_tokens": 2}).encode()
    r = httpx.post(f"{guarded.url}/v1/chat/completions", content=body, timeout=60,
                   headers={"content-type": "application/json; charset=utf-8", **bearer(USER)})
    assert r.status_code == 200, r.text
    # No body, no content type: not a 415 (the route's own answer, here an unknown run).
    r = httpx.post(f"{guarded.url}/v1/training/runs/nope/cancel", headers=bearer(ADMIN), timeout=30)
    assert r.status_code == 404, r.text


def test_plugin_routes_take_json_only(guarded: AppServer) -> None:
    cid = _complete(guarded, USER)
    url = f"{guarded.url}/v1/plugins/reactions/reaction"
    token = {"x-reaction-token": feedback_plugins.Reactions.TOKEN}
    before = _reactions(guarded, cid)
    r = httpx.post(url, content=json.dumps({"completion_id": cid, "emoji": "+1"}),
                   headers={**token, "content-type": "text/plain"}, timeout=30)
    assert_openai_error(r, 415, "invalid_request_error", "unsupported_media_type")
    assert _reactions(guarded, cid) == before
    assert httpx.post(url, json={"completion_id": cid, "emoji": "+1"}, headers=token, timeout=30).status_code == 201


# --- hosts -------------------------------------------------------------------------------------------------------


def test_a_foreign_host_header_is_refused_400(server: AppServer) -> None:
    """DNS rebinding: a page on attacker.example resolves its name to 127.0.0.1; the request arrives with its
    Host header, and must get nothing."""
    port = server.url.rsplit(":", 1)[1]
    with Unchanged(server):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"),
                             ("GET", "/metrics"), ("GET", "/")):
            r = httpx.request(method, f"{server.url}{path}", headers={"host": f"attacker.example:{port}"},
                              json={"model": "alignd", "messages": HELLO, "max_tokens": 4} if method == "POST"
                              else None, timeout=30)
            error = assert_openai_error(r, 400, "invalid_request_error", "invalid_host")
            assert "--allowed-host" in error["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{server.url}/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_setting(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(allowed_hosts=["alignd.test", "*.corp.test", "127.0.0.1"])
    for host, status in (("alignd.test", 200), ("alignd.test:8000", 200), ("chat.corp.test", 200),
                         ("corp.test", 400), ("localhost", 400), ("alignd.test.evil", 400), ("127.0.0.1", 200)):
        r = httpx.get(f"{srv.url}/v1/models", headers={"host": host}, timeout=30)
        assert r.status_code == status, (host, r.text)
    anything = make_server(allowed_hosts=["*"])
    assert httpx.get(f"{anything.url}/health", headers={"host": "whatever.example"}).status_code == 200


# --- body limit --------------------------------------------------------------------------------------------------


def test_one_body_limit_covers_plugin_routes(guarded: AppServer) -> None:
    cid = _complete(guarded, USER)
    url = f"{guarded.url}/v1/plugins/reactions/reaction"
    token = {"x-reaction-token": feedback_plugins.Reactions.TOKEN}
    big = {"completion_id": cid, "emoji": "+1", "user": "x" * 20_000}  # over the 8 KiB limit
    before = _reactions(guarded, cid)
    r = httpx.post(url, json=big, headers=token, timeout=30)
    assert_openai_error(r, 413, "invalid_request_error", "request_too_large")
    # Sent in chunks with no Content-Length: cut as it arrives.
    data = json.dumps(big).encode()
    chunks = (data[i:i + 1024] for i in range(0, len(data), 1024))
    r = httpx.post(url, content=chunks, headers={**token, "content-type": "application/json"}, timeout=30)
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, "invalid_request_error", "request_too_large")
    assert _reactions(guarded, cid) == before
    # The same limit on the API's own routes.
    with Unchanged(guarded):
        r = httpx.post(f"{guarded.url}/v1/chat/completions", headers=bearer(USER), timeout=30,
                       json={"model": "alignd", "messages": [{"role": "user", "content": "x" * 10_000}]})
        assert_openai_error(r, 413, "invalid_request_error", "request_too_large")


# --- metrics, schema, ready --------------------------------------------------------------------------------------


def test_metrics_and_schema_need_a_key_when_keys_are_set(guarded: AppServer) -> None:
    for path in ("/metrics", "/schema", "/schema/openapi.json"):
        assert_openai_error(httpx.get(f"{guarded.url}{path}"), 401, "authentication_error", "invalid_api_key")
        assert_openai_error(httpx.get(f"{guarded.url}{path}", headers=bearer("wrong")), 401,
                            "authentication_error", "invalid_api_key")
    metrics = httpx.get(f"{guarded.url}/metrics", headers=bearer(USER))
    assert metrics.status_code == 200 and "alignd_requests_total" in metrics.text
    assert httpx.get(f"{guarded.url}/metrics", headers=bearer(ADMIN)).status_code == 200
    schema = httpx.get(f"{guarded.url}/schema/openapi.json", headers=bearer(USER))
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    # The probes stay open for orchestrators.
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/ready").json()["status"] == "ready"


def test_ready_tells_no_exception_text(guarded: AppServer) -> None:
    secret = "connection to postgresql://alignd:hunter2@db/alignd refused"
    real = guarded.state.engine

    class FailingHealth:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def check_health(self) -> None:
            raise RuntimeError(secret)

    guarded.state.engine = FailingHealth()
    try:
        r = httpx.get(f"{guarded.url}/ready")
    finally:
        guarded.state.engine = real
    assert r.status_code == 503 and r.json()["status"] == "unhealthy"
    assert "hunter2" not in r.text and "RuntimeError" not in r.text and "postgresql" not in r.text
    assert httpx.get(f"{guarded.url}/ready").status_code == 200


# --- per-caller chat limits --------------------------------------------------------------------------------------


def test_rate_limit_is_a_429_with_retry_after_per_key(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(api_keys=[USER, OTHER], chat_requests_per_minute=3, chat_max_concurrent=0)
    for _ in range(3):
        assert _chat(srv, USER).status_code == 200
    with Unchanged(srv):
        r = _chat(srv, USER)
        error = assert_openai_error(r, 429, "rate_limit_error", "rate_limit_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 20 and "3 chat requests a minute" in error["message"]
        # The openai SDK sees its own RateLimitError.
        sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=USER, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="alignd", messages=HELLO, max_tokens=2)
        # A request refused before the limit is counted against no one: a bad key is a 401, not a 429.
        assert _chat(srv, "wrong").status_code == 401
    assert _chat(srv, OTHER).status_code == 200, "another key has its own bucket"


def test_without_keys_the_limit_is_per_client_address(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(chat_requests_per_minute=2)
    assert [_chat(srv, None).status_code for _ in range(3)] == [200, 200, 429]


def test_concurrency_limit_refuses_rather_than_queues(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(api_keys=[USER, OTHER], chat_max_concurrent=2, chat_requests_per_minute=0)
    with _open_stream(srv, USER), _open_stream(srv, USER):
        assert srv.state.chat_limits.in_flight(key_caller(USER)) == 2
        with Unchanged(srv):
            started = time.perf_counter()
            r = _chat(srv, USER)
            assert time.perf_counter() - started < 5, "refused at once, not queued"
            assert_openai_error(r, 429, "rate_limit_error", "too_many_concurrent_requests")
            assert r.headers["retry-after"] in {"1", "2", "3"}
        assert _chat(srv, OTHER).status_code == 200, "another key is not held up"
    # Both streams were closed before their end (client gone): their slots are free again.
    _wait(lambda: srv.state.chat_limits.in_flight(key_caller(USER)) == 0)
    assert _chat(srv, USER).status_code == 200


def test_one_key_flooding_does_not_starve_another(make_server: Callable[..., AppServer]) -> None:
    """200 concurrent n=16 requests from one key (each retried after Retry-After, as the SDK does) while a second
    key's time to first token stays within 2x its baseline, the same key's alone. One request in flight per key
    (16 sequences) is what a two-core test machine has room for: the flood's refusals cost next to nothing, and the
    one admitted request is all the flooding key gets (here the second key's time to first token was the same under
    the flood as beside one well-behaved client of the first key). Without the limit all 3200 sequences queue ahead
    of the second key: 25-35 s to its first token instead of about 30 ms. Rounds alone and flooded alternate so that
    other work on the machine weighs on both alike.
    """
    flood_key, calm_key = "flood-key", "calm-key"
    srv = make_server(api_keys=[flood_key, calm_key], chat_max_concurrent=1, chat_requests_per_minute=0)
    refused = srv.state.metrics.requests.labels("/v1/chat/completions", "POST", "429")
    for _ in range(3):
        _ttft(srv, calm_key)  # warm-up
    alone: list[float] = []
    flooded: list[float] = []
    for _ in range(3):
        alone += _ttfts(srv, calm_key, 5)
        before = refused._value.get()
        flood = subprocess.Popen([sys.executable, "-m", "tests.flood_client", srv.url, flood_key, "200"], cwd=REPO,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            _wait(lambda before=before: srv.state.chat_limits.in_flight(key_caller(flood_key)) == 1
                  and refused._value.get() - before >= 199)
            flooded += _ttfts(srv, calm_key, 5)
            assert srv.state.chat_limits.in_flight(key_caller(flood_key)) == 1
            out, _ = flood.communicate("", timeout=300)
        finally:
            if flood.poll() is None:
                flood.kill()
        counts = json.loads(out)
        assert counts["errors"] == [], counts["errors"][:3]
        assert counts["ok_n16"] >= 1 and counts["refused"] >= 199
        _wait(lambda: srv.state.chat_limits.in_flight(key_caller(flood_key)) == 0)
    baseline, loaded = statistics.median(alone), statistics.median(flooded)
    assert loaded <= 2 * baseline, (
        f"second key's TTFT {loaded * 1000:.0f} ms under the flood vs {baseline * 1000:.0f} ms alone (samples "
        f"{[round(t * 1000) for t in flooded]} vs {[round(t * 1000) for t in alone]})")


# --- helpers -----------------------------------------------------------------------------------------------------


def _chat(srv: AppServer, key: str | None, **body: Any) -> httpx.Response:
    body = {"model": "alignd", "messages": HELLO, "max_tokens": 2, **body}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=bearer(key) if key else None,
                      timeout=120)


def _complete(srv: AppServer, key: str) -> str:
    r = _chat(srv, key)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _reactions(srv: AppServer, completion_id: str) -> int:
    return len(srv.loop.run(srv.state.store.list_feedback(completion_id=completion_id, kind="thumbs")))


def _wait(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class _open_stream:
    """A long streaming chat request (16 x 480 tokens: seconds of generation, and more output than the socket
    buffers hold while nobody reads), open for the ``with`` block, then closed before its end."""

    def __init__(self, srv: AppServer, key: str) -> None:
        self.client = httpx.Client(timeout=120)
        self.request = self.client.build_request(
            "POST", f"{srv.url}/v1/chat/completions", headers=bearer(key),
            json={"model": "alignd", "messages": HELLO, "max_tokens": 480, "ignore_eos": True, "stream": True,
                  "n": 16, "temperature": 1.0})

    def __enter__(self) -> httpx.Response:
        self.response = self.client.send(self.request, stream=True)
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()  # kept: a dropped iterator closes the connection
        next(self.lines)
        return self.response

    def __exit__(self, *_: object) -> None:
        self.response.close()
        self.client.close()


def _ttft(srv: AppServer, key: str) -> float:
    """Seconds from sending a streamed chat request until its first content arrives (the rest is read too: a
    client that hangs up is another test)."""
    body = {"model": "alignd", "messages": HELLO, "max_tokens": 4, "stream": True}
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=bearer(key), timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and any(
                    c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
                first = time.perf_counter() - started
    if first is not None:
        return first
    raise AssertionError("no content in the stream")


def _ttfts(srv: AppServer, key: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        samples.append(_ttft(srv, key))
        time.sleep(0.1)
    return samples
