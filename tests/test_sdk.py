"""The Python SDK (``alignd.clients.sdk``) against the real server and engine: chat (plain, streamed, extra
fields), every feedback method, export, API keys, the error mapping, and the async client. The retry policy
(429/503 with ``Retry-After``, connection failures, idempotency keys on retried feedback) is tested against a
small scripted HTTP stub, since a real server will not answer 503 on cue."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import msgspec
import pytest

import alignd.clients.sdk as sdk
from alignd.clients import (
    AligndError,
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnavailableError,
    UnprocessableEntityError,
)
from alignd.protocol import ChatCompletion, ChatCompletionChunk, ChatMessage, FeedbackCreated
from tests.serverkit import AppServer

ADMIN_KEY = "sdk-admin-key"
USER_KEY = "sdk-user-key"
HELLO = [{"role": "user", "content": "How do I bake bread at home?"}]


@pytest.fixture(scope="module")
def srv(make_server: Callable[..., AppServer]) -> AppServer:
    """An open server (no API keys) with an admin key for the export."""
    return make_server(admin_keys=[ADMIN_KEY])


@pytest.fixture(scope="module")
def keyed(make_server: Callable[..., AppServer]) -> AppServer:
    """A server that requires API keys."""
    return make_server(api_keys=[USER_KEY], admin_keys=[ADMIN_KEY])


@pytest.fixture(scope="module")
def client(srv: AppServer) -> Iterator[Client]:
    with Client(srv.url, api_key=ADMIN_KEY) as c:
        yield c


def events_of(client: Client, completion_id: str) -> list[dict[str, Any]]:
    return [e for e in client.export("events") if e["completion_id"] == completion_id]


# --- chat ----------------------------------------------------------------------------------------------------------


def test_chat_returns_a_typed_completion(client: Client) -> None:
    reply = client.chat(HELLO, n=2, temperature=1.0, max_tokens=12)
    assert isinstance(reply, ChatCompletion)
    assert reply.id.startswith("chatcmpl-") and reply.system_fingerprint == "policy-0"
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason in ("stop", "length") for c in reply.choices)
    assert 0 < reply.usage.completion_tokens <= 24


def test_chat_passes_extra_fields_through(client: Client) -> None:
    """``seed`` travels as an extra field: the same seed samples the same reply, and another seed need not."""
    same = [client.chat(HELLO, temperature=1.0, max_tokens=24, seed=1234).choices[0].message.content
            for _ in range(2)]
    assert same[0] == same[1]
    with pytest.raises(BadRequestError) as e:
        client.chat(HELLO, logprobs=True)  # an extra field the server refuses by name
    assert e.value.param == "logprobs"


def test_chat_accepts_protocol_messages(client: Client) -> None:
    messages = [ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="Any tips on growing tomatoes?")]
    reply = client.chat(messages, max_tokens=8)
    client.feedback.thumbs(reply.id)
    [event] = events_of(client, reply.id)
    assert event["prompt"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Any tips on growing tomatoes?"}]


def test_stream_yields_chunks_that_add_up_to_the_stored_reply(client: Client) -> None:
    chunks = list(client.chat(HELLO, stream=True, max_tokens=20, stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].system_fingerprint == "policy-0"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text
    finished = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finished in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    client.feedback.thumbs(chunks[0].id, "up")
    [event] = events_of(client, chunks[0].id)
    assert event["choices"] == [text], "the streamed deltas are the stored reply"


def test_stream_can_be_closed_early(client: Client) -> None:
    with client.chat(HELLO, stream=True, max_tokens=40) as stream:
        first = next(stream)
    assert first.choices[0].delta.role == "assistant"
    assert list(stream) == []
    assert client.chat(HELLO, max_tokens=4).choices, "the client still works after an abandoned stream"


# --- feedback and export -------------------------------------------------------------------------------------------


def test_every_feedback_method_stores_its_kind(client: Client) -> None:
    reply = client.chat(HELLO, n=3, temperature=1.0, max_tokens=12)
    texts = [c.message.content for c in reply.choices]
    sent = [
        client.feedback.thumbs(reply.id, "down", choice=1, comment="meh", tags=["bread"], user="ann"),
        client.feedback.rank(reply.id, [2, 0, 1]),
        client.feedback.pairwise(reply.id, winner=2, choices=[0, 2]),
        client.feedback.pairwise(reply.id, winner="both_bad"),
        client.feedback.rate(reply.id, 8, choice=2),
        client.feedback.edit(reply.id, "Mix, knead, rise, bake.", choice=0),
    ]
    assert all(isinstance(f, FeedbackCreated) and f.completion_id == reply.id for f in sent)
    assert [(f.kind, f.pairs, f.labels) for f in sent] == [
        ("thumbs", 0, 1), ("ranking", 3, 0), ("pairwise", 1, 0), ("pairwise", 0, 2), ("rating", 0, 1),
        ("edit", 1, 0)]
    events = events_of(client, reply.id)
    assert [e["id"] for e in events] == [f.id for f in sent]
    assert [e["payload"] for e in events] == [
        {"value": "down", "choice": 1}, {"ranking": [2, 0, 1]}, {"winner": 2, "choices": [0, 2]},
        {"winner": "both_bad", "choices": [0, 1]}, {"score": 8, "choice": 2},
        {"text": "Mix, knead, rise, bake.", "choice": 0}]
    assert (events[0]["comment"], events[0]["tags"], events[0]["user"]) == ("meh", ["bread"], "ann")
    assert events[0]["choices"] == texts

    prefs = [p for p in client.export() if p["completion_id"] == reply.id]
    assert {(p["kind"], p["chosen_choice"], p["rejected_choice"]) for p in prefs} == {
        ("ranking", 2, 0), ("ranking", 2, 1), ("ranking", 0, 1), ("pairwise", 2, 0), ("edit", None, 0)}
    kto = [k for k in client.export("kto") if k["completion_id"] == reply.id]
    assert sorted((k["kind"], k["choice"], k["label"]) for k in kto) == [
        ("pairwise", 0, False), ("pairwise", 1, False), ("rating", 2, True), ("thumbs", 1, False)]


def test_export_since_and_policy_filters(client: Client) -> None:
    reply = client.chat(HELLO, n=2, temperature=1.0, max_tokens=8)
    first = client.feedback.pairwise(reply.id, winner=0)
    second = client.feedback.pairwise(reply.id, winner=1)
    since = datetime.fromisoformat(second.created.replace("Z", "+00:00"))
    later = [p["feedback_id"] for p in client.export("preferences", since) if p["completion_id"] == reply.id]
    assert later == [second.id]
    everything = [p["feedback_id"] for p in client.export("preferences", policy=0)
                  if p["completion_id"] == reply.id]
    assert everything == [first.id, second.id]
    assert not [p for p in client.export("preferences", policy=7) if p["completion_id"] == reply.id]


def test_idempotency_keys(client: Client) -> None:
    reply = client.chat(HELLO, n=2, temperature=1.0, max_tokens=8)
    once = client.feedback.thumbs(reply.id, idempotency_key="sdk-test-key-1")
    again = client.feedback.thumbs(reply.id, idempotency_key="sdk-test-key-1")
    assert again.id == once.id, "the same key replays the first answer"
    with pytest.raises(ConflictError) as e:
        client.feedback.thumbs(reply.id, "down", idempotency_key="sdk-test-key-1")
    assert (e.value.status, e.value.code, e.value.param) == (409, "idempotency_key_reused", "idempotency_key")
    # Without a key each call is its own event (the SDK's generated keys differ).
    twice = [client.feedback.thumbs(reply.id, choice=1) for _ in range(2)]
    assert twice[0].id != twice[1].id
    assert len(events_of(client, reply.id)) == 3


# --- keys and errors -----------------------------------------------------------------------------------------------


def test_api_keys(keyed: AppServer) -> None:
    with Client(keyed.url, api_key=USER_KEY) as user:
        reply = user.chat(HELLO, max_tokens=8)
        assert user.feedback.thumbs(reply.id).kind == "thumbs"
        with pytest.raises(PermissionDeniedError) as denied:
            next(user.export())
        assert denied.value.status == 403 and denied.value.code == "insufficient_permissions"
    for key in ("wrong-key", None):
        with Client(keyed.url, api_key=key) as stranger, pytest.raises(AuthenticationError) as e:
            stranger.chat(HELLO, max_tokens=8)
        assert (e.value.status, e.value.code, e.value.type) == (401, "invalid_api_key", "authentication_error")
    with Client(keyed.url, api_key="wrong-key") as stranger, pytest.raises(AuthenticationError):
        stranger.chat(HELLO, stream=True)  # a stream's error is raised by the call, before any iteration
    with Client(keyed.url, api_key=ADMIN_KEY) as admin:
        assert any(e["completion_id"] == reply.id for e in admin.export("events"))


def test_error_mapping(client: Client) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.feedback.thumbs("chatcmpl-does-not-exist")
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "not_found", "completion_id")
    assert "chatcmpl-does-not-exist" in missing.value.message

    reply = client.chat(HELLO, n=2, temperature=1.0, max_tokens=8)
    with pytest.raises(UnprocessableEntityError) as score:
        client.feedback.rate(reply.id, 11)
    assert (score.value.status, score.value.param, score.value.code) == (422, "score", "invalid_feedback")
    with pytest.raises(UnprocessableEntityError) as ranking:
        client.feedback.rank(reply.id, [0, 5])
    assert ranking.value.param == "ranking" and "5" in ranking.value.message

    with pytest.raises(BadRequestError) as greedy:
        client.chat(HELLO, n=2, temperature=0)
    assert (greedy.value.status, greedy.value.param) == (400, "temperature")
    with pytest.raises(NotFoundError) as model:
        client.chat(HELLO, model="no-such-model")
    assert model.value.code == "model_not_found"
    with pytest.raises(BadRequestError) as long:
        client.chat(HELLO, max_tokens=100_000)
    assert long.value.code == "context_length_exceeded" and long.value.param == "max_tokens"
    assert isinstance(long.value, AligndError) and str(long.value).startswith("400 ")


def test_connection_refused_is_an_api_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(Client, "_sleep", sleeps.append)
    with Client(f"http://127.0.0.1:{_free_port()}", max_retries=2) as c, pytest.raises(APIConnectionError):
        c.chat(HELLO)
    assert len(sleeps) == 2, "a refused connection is retried max_retries times"


# --- the async client ----------------------------------------------------------------------------------------------


async def test_async_client(srv: AppServer) -> None:
    async with AsyncClient(srv.url, api_key=ADMIN_KEY) as client:
        reply = await client.chat(HELLO, n=2, temperature=1.0, max_tokens=12)
        assert isinstance(reply, ChatCompletion) and len(reply.choices) == 2
        stream = await client.chat(HELLO, stream=True, max_tokens=12)
        chunks = [chunk async for chunk in stream]
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        on_reply = [await client.feedback.pairwise(reply.id, winner=1), await client.feedback.rank(reply.id, [0]),
                    await client.feedback.rate(reply.id, 3), await client.feedback.edit(reply.id, "Better.")]
        assert [(c.kind, c.pairs) for c in on_reply] == [("pairwise", 1), ("ranking", 1), ("rating", 0), ("edit", 1)]
        thumbs = await client.feedback.thumbs(chunks[0].id, "down")
        events = [e async for e in client.export("events") if e["completion_id"] in (reply.id, chunks[0].id)]
        assert [e["id"] for e in events if e["completion_id"] == reply.id] == [c.id for c in on_reply]
        [streamed] = [e for e in events if e["completion_id"] == chunks[0].id]
        assert streamed["id"] == thumbs.id and streamed["choices"] == [text]
        with pytest.raises(NotFoundError):
            await client.feedback.thumbs("chatcmpl-nope")
        with pytest.raises(UnprocessableEntityError) as e:
            await client.feedback.pairwise(reply.id, winner=5)
        assert e.value.param == "winner"


# --- retries, against a scripted stub ------------------------------------------------------------------------------


@dataclass
class Scripted:
    """One scripted answer: a status, headers and a JSON body; ``drop`` closes the connection without answering."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] | None = None
    drop: bool = False


class StubHandler(BaseHTTPRequestHandler):
    script: ClassVar[list[Scripted]] = []
    seen: ClassVar[list[tuple[str, str, dict[str, Any] | None]]] = []

    def log_message(self, *_: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.seen.append((self.command, self.path, json.loads(raw) if raw else None))
        step = self.script.pop(0)
        if step.drop:
            self.close_connection = True
            return
        payload = json.dumps(step.body).encode()
        self.send_response(step.status)
        for name, value in (step.headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[StubHandler], list[float]]]:
    """A scripted HTTP server; the SDK's sleeps are recorded instead of waited."""
    StubHandler.script, StubHandler.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    sleeps: list[float] = []
    monkeypatch.setattr(Client, "_sleep", sleeps.append)
    yield f"http://127.0.0.1:{httpd.server_address[1]}", StubHandler, sleeps
    httpd.shutdown()
    httpd.server_close()


FEEDBACK_CREATED = msgspec.to_builtins(FeedbackCreated(id="fb-1", completion_id="chatcmpl-1", kind="thumbs",
                                                       created="2026-01-01T00:00:00Z", pairs=0, labels=1))
UNAVAILABLE = {"error": {"message": "The model is still loading; retry shortly.", "type": "server_error",
                         "param": None, "code": "unavailable"}}


def test_503_is_retried_after_the_retry_after_delay_with_the_same_idempotency_key(stub: Any) -> None:
    url, handler, sleeps = stub
    handler.script += [Scripted(503, UNAVAILABLE, {"Retry-After": "2"}), Scripted(201, FEEDBACK_CREATED)]
    with Client(url) as c:
        created = c.feedback.thumbs("chatcmpl-1", "up")
    assert created.id == "fb-1"
    assert sleeps == [2.0], "Retry-After, not the default backoff"
    [(_, path, first), (_, _, second)] = handler.seen
    assert path == "/v1/feedback"
    assert first is not None and second is not None and first == second
    assert first["idempotency_key"].startswith("sdk-"), "a generated key makes the retry a replay"


def test_backoff_without_retry_after_grows_with_jitter_and_gives_up(stub: Any) -> None:
    url, handler, sleeps = stub
    handler.script += [Scripted(429, {"error": {"message": "slow down", "type": "rate_limit_error",
                                                "code": "rate_limit_exceeded"}})] * 4
    with Client(url, max_retries=3) as c, pytest.raises(RateLimitError) as e:
        c.feedback.rate("chatcmpl-1", 5)
    assert (e.value.status, e.value.code, e.value.message) == (429, "rate_limit_exceeded", "slow down")
    assert len(handler.seen) == 4 and len(sleeps) == 3
    for attempt, slept in enumerate(sleeps):  # exponential base 0.5 s, times a jitter factor in [0.5, 1]
        assert 0.5 * 2**attempt * 0.5 <= slept <= 0.5 * 2**attempt
    keys = {body["idempotency_key"] for _, _, body in handler.seen if body}
    assert len(keys) == 1, "every retry of one call carries the same key"


def test_503_exhausted_raises_unavailable(stub: Any) -> None:
    url, handler, sleeps = stub
    handler.script += [Scripted(503, UNAVAILABLE, {"Retry-After": "1"})] * 2
    with Client(url, max_retries=1) as c, pytest.raises(UnavailableError) as e:
        c.chat(HELLO)
    assert e.value.code == "unavailable" and e.value.headers.get("retry-after") == "1"
    assert sleeps == [1.0] and len(handler.seen) == 2


def test_other_4xx_are_never_retried(stub: Any) -> None:
    url, handler, sleeps = stub
    handler.script += [Scripted(400, {"error": {"message": "bad", "type": "invalid_request_error",
                                                "param": "n", "code": None}})]
    handler.script += [Scripted(409, {"error": {"message": "busy", "type": "invalid_request_error",
                                                "code": "run_in_progress"}})]
    handler.script += [Scripted(404, "plain text, not OpenAI's shape")]
    with Client(url) as c:
        with pytest.raises(BadRequestError) as bad:
            c.chat(HELLO)
        with pytest.raises(ConflictError) as busy:
            c.training.start()
        with pytest.raises(NotFoundError) as missing:
            c.policies.get(3)
    assert bad.value.param == "n" and busy.value.code == "run_in_progress" and missing.value.code is None
    assert "plain text" in missing.value.message
    assert [(m, p) for m, p, _ in handler.seen] == [("POST", "/v1/chat/completions"), ("POST", "/v1/training/runs"),
                                                   ("GET", "/v1/policies/3")]
    assert sleeps == []


def test_a_dropped_connection_is_retried_only_when_repeating_is_safe(stub: Any) -> None:
    url, handler, sleeps = stub
    handler.script += [Scripted(drop=True)]
    with Client(url) as c, pytest.raises(APIConnectionError):
        c.chat(HELLO)  # the server may have generated (and stored) it: do not ask twice
    assert len(handler.seen) == 1 and sleeps == []

    handler.script += [Scripted(drop=True), Scripted(201, FEEDBACK_CREATED)]
    with Client(url) as c:
        assert c.feedback.pairwise("chatcmpl-1", winner="tie").id == "fb-1"  # idempotent: replayed, not doubled
    assert len(handler.seen) == 3 and len(sleeps) == 1
    assert handler.seen[1][2] == handler.seen[2][2]


async def test_async_retry_honours_retry_after(stub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler, _ = stub
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(AsyncClient, "_sleep", staticmethod(fake_sleep))
    handler.script += [Scripted(503, UNAVAILABLE, {"Retry-After": "3"}), Scripted(201, FEEDBACK_CREATED)]
    async with AsyncClient(url) as c:
        assert (await c.feedback.edit("chatcmpl-1", "fixed")).id == "fb-1"
    assert slept == [3.0] and handler.seen[0][2] == handler.seen[1][2]


def test_retry_after_parsing() -> None:
    assert sdk.retry_after_s({"retry-after": "7"}) == 7.0
    assert sdk.retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0, "a past date: no wait"
    assert sdk.retry_after_s({"retry-after": "soon"}) is None
    assert sdk.retry_after_s({}) is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
