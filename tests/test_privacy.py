"""Privacy through real HTTP against the real server and engine: redaction of prompts and replies in the exports, the
JSONL sink and the webhook; the webhook's timestamped signature checked by a real receiver with
``alignd.clients.webhooks.verify`` (a replay and a tampered body refused); per-user deletion (every table checked,
idempotent, the 403/404 rules, SDK and CLI); retention now and on its own schedule (SQLite and PostgreSQL). Refusals
are OpenAI-shaped and change nothing. The redactor and the verification helper are also tested on their own."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import msgspec
import pytest
from sqlalchemy import func, or_, select

from alignd import Feedback, Signal, hookimpl
from alignd.clients import AsyncClient, Client, NotFoundError, PermissionDeniedError, UnprocessableEntityError
from alignd.clients.webhooks import (
    LEGACY_SIGNATURE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookVerificationError,
    sign,
    verify,
)
from alignd.config import load_settings
from alignd.feedback.manager import make_plugin_manager
from alignd.feedback.redaction import Redactor
from alignd.protocol import RowCounts, ThumbsFeedback
from alignd.store import ChoiceRecord, CompletionRecord, FeedbackRecord, Label, PreferencePair
from alignd.store.tables import choices, completions, feedback, labels, preference_pairs
from tests.engine_fixtures import create_pg_database
from tests.serverkit import AppServer
from tests.store_reads import get_completion
from tests.test_security import assert_openai_error, bearer

REPO = Path(__file__).resolve().parent.parent
ADMIN, ALICE, WEB = "admin-key-71c2", "alice-user-key-5e0a", "web-frontend-key-c9d4"
SECRET = "whsec-test-2f8e"
# What the end users wrote, and what must never leave the server while pii_redact is loaded.
PROMPT = "I am jane.doe@example.com, call me on +44 20 7946 0958. How do I bake bread at home?"
REPLY = "Mail bob.smith@example.org or ring 020 7946 0123 for the recipe."
COMMENT = "wrong, ask chef.li@example.net or 555-123-4567"
EDIT = "Write to baker@example.co.uk, or phone (555) 987-6543."
RAW = ["jane.doe@example.com", "7946 0958", "bob.smith@example.org", "7946 0123", "chef.li@example.net",
       "555-123-4567", "baker@example.co.uk", "987-6543"]
TABLES = {"completions": completions, "choices": choices, "feedback": feedback, "preference_pairs": preference_pairs,
          "labels": labels}


# --- a real webhook receiver -------------------------------------------------------------------------------------


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that checks each request with ``verify`` (its clock ``skew_s`` ahead) and answers 401 to
    one that fails, keeping what it accepted and why it refused."""

    skew_s: ClassVar[float]
    accepted: ClassVar[list[tuple[dict[str, str], bytes]]]
    refused: ClassVar[list[str]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        try:
            verify(body, dict(self.headers), SECRET, now=time.time() + type(self).skew_s)
        except WebhookVerificationError as e:
            type(self).refused.append(str(e))
            status = 401
        else:
            type(self).accepted.append((dict(self.headers), body))
            status = 200
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, type[Receiver]]]:
    handler = type("ModuleReceiver", (Receiver,), {"skew_s": 0.0, "accepted": [], "refused": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", handler
    httpd.shutdown()


@pytest.fixture(scope="module")
def priv(make_server: Callable[..., AppServer], receiver: tuple[str, type[Receiver]],
         tmp_path_factory: pytest.TempPathFactory) -> AppServer:
    """Keys of every role, the JSONL sink and the signed webhook on, pii_redact loaded (the default)."""
    jsonl = tmp_path_factory.mktemp("sink") / "events.jsonl"
    return make_server(admin_keys=[ADMIN], keys=[f"alice:user:{ALICE}", f"web:frontend:{WEB}"],
                       plugins={"jsonl_path": str(jsonl), "webhook_url": receiver[0], "webhook_secret": SECRET,
                                "webhook_backoff_s": 0.05})


# --- helpers -----------------------------------------------------------------------------------------------------


def chat(srv: AppServer, key: str, content: str = "How do I bake bread at home?", **body: Any) -> str:
    body = {"model": "alignd", "messages": [{"role": "user", "content": content}], "n": 2, "max_tokens": 8,
            "temperature": 1.0, **body}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=bearer(key), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def send(srv: AppServer, key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/feedback", json=body, headers=bearer(key), timeout=60)


def judge(srv: AppServer, key: str, cid: str, **common: Any) -> list[str]:
    """Up on choice 0, down on choice 1 (a pair and two labels): the events' ids."""
    ids = []
    for choice, value in ((0, "up"), (1, "down")):
        r = send(srv, key, completion_id=cid, kind="thumbs", choice=choice, value=value, **common)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def wait_for(condition: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def stored_completion(srv: AppServer, *, user: str, principal: str | None, age: timedelta = timedelta(0),
                      reply: str = "Knead it well.") -> str:
    """A completion written straight into the app's store (a real model does not write e-mail addresses)."""
    record = CompletionRecord(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=datetime.now(UTC) - age, model="alignd", policy_version=0,
        messages=[{"role": "user", "content": PROMPT}], params={"n": 2}, user=user, metadata={"note": PROMPT},
        prompt_tokens=20, completion_tokens=12, latency_ms=5.0, stream=False, principal=principal,
        choices=[ChoiceRecord(index=0, text=reply, token_ids=[5, 6], finish_reason="stop"),
                 ChoiceRecord(index=1, text="No idea.", token_ids=[7], finish_reason="stop")])
    srv.loop.run(srv.state.store.record_completion(record))
    return record.id


def stored_feedback(srv: AppServer, completion_id: str, *, user: str, age: timedelta) -> str:
    prompt = [{"role": "user", "content": PROMPT}]
    record = FeedbackRecord(
        id=f"fb-{uuid.uuid4().hex}", completion_id=completion_id, kind="thumbs", choice=0,
        payload={"value": "up", "choice": 0}, user=user, comment=None, tags=[], idempotency_key=None,
        request_hash=None, policy_version=0, created=datetime.now(UTC) - age,
        pairs=[PreferencePair(prompt=prompt, chosen="Knead it well.", rejected="No idea.")],
        labels=[Label(prompt=prompt, reply="Knead it well.", good=True, choice=0)])
    srv.loop.run(srv.state.store.record_feedback(record))
    return record.id


def table_counts(srv: AppServer) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with srv.state.store.engine.connect() as conn:
            return {name: (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                    for name, table in TABLES.items()}

    return srv.loop.run(read())


def rows_of(srv: AppServer, user: str, completion_ids: list[str], feedback_ids: list[str]) -> dict[str, int]:
    """Rows anywhere that belong to ``user``, or to these completions and events."""
    async def read() -> dict[str, int]:
        async with srv.state.store.engine.connect() as conn:
            async def count(table: Any, *conditions: Any) -> int:
                return (await conn.execute(select(func.count()).select_from(table).where(or_(*conditions))))\
                    .scalar_one()
            return {
                "completions": await count(completions, completions.c.user == user,
                                           completions.c.id.in_(completion_ids)),
                "choices": await count(choices, choices.c.completion_id.in_(completion_ids)),
                "feedback": await count(feedback, feedback.c.user == user, feedback.c.id.in_(feedback_ids),
                                        feedback.c.completion_id.in_(completion_ids)),
                "preference_pairs": await count(preference_pairs, preference_pairs.c.feedback_id.in_(feedback_ids),
                                                preference_pairs.c.completion_id.in_(completion_ids)),
                "labels": await count(labels, labels.c.feedback_id.in_(feedback_ids),
                                      labels.c.completion_id.in_(completion_ids)),
            }

    return srv.loop.run(read())


def metric(srv: AppServer, line_start: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", headers=bearer(ADMIN)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alignd.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


# --- redaction ---------------------------------------------------------------------------------------------------


def test_redaction_covers_prompts_and_replies_in_the_exports_the_jsonl_sink_and_the_webhook(
        priv: AppServer, receiver: tuple[str, type[Receiver]]) -> None:
    _, hook = receiver
    engine_made = chat(priv, WEB, PROMPT, user="erin")  # the prompt through the real engine
    stored = stored_completion(priv, user="erin", principal="web", reply=REPLY)  # a reply that holds PII too
    events = judge(priv, WEB, engine_made, comment=COMMENT, tags=["jane.doe@example.com"])
    events += judge(priv, WEB, stored, comment=COMMENT)
    edit = send(priv, WEB, completion_id=stored, kind="edit", choice=0, text=EDIT)
    assert edit.status_code == 201, edit.text
    events.append(edit.json()["id"])

    outputs = {fmt: httpx.get(f"{priv.url}/v1/feedback/export", params={"format": fmt}, headers=bearer(ADMIN),
                              timeout=60).text for fmt in ("preferences", "kto", "events")}
    outputs["listing"] = httpx.get(f"{priv.url}/v1/feedback", params={"limit": 1000}, headers=bearer(ADMIN)).text
    sink_path = Path(priv.state.settings.plugins.jsonl_path or "")

    def sunk() -> str | None:
        text = sink_path.read_text() if sink_path.exists() else ""
        return text if all(e in text for e in events) else None

    outputs["jsonl"] = wait_for(sunk)
    wait_for(lambda: {json.loads(body)["id"] for _, body in hook.accepted} >= set(events))
    outputs["webhook"] = "\n".join(body.decode() for _, body in hook.accepted)

    for where, text in outputs.items():
        for raw in RAW:
            assert raw not in text, f"{raw!r} left the server in the {where}"
    # The texts are there, masked: every event of both completions, the prompt and the reply included.
    for where in ("events", "listing", "jsonl", "webhook"):
        lines = [json.loads(line) for line in outputs[where].splitlines() if line.strip()] if where != "listing" \
            else json.loads(outputs[where])["data"]
        mine = [line for line in lines if line["id"] in events]
        assert len(mine) == len(events), where
        assert all(line["prompt"][0]["content"].startswith("I am [email], call me on [phone].") for line in mine)
        assert any("Mail [email] or ring [phone]" in c for line in mine for c in line["choices"]), where
    pair = next(json.loads(line) for line in outputs["preferences"].splitlines()
                if json.loads(line)["completion_id"] == stored and json.loads(line)["kind"] == "thumbs")
    assert pair["chosen"] == [{"role": "assistant", "content": "Mail [email] or ring [phone] for the recipe."}]
    # Inside, the store keeps what was written: the trainer learns from the conversation itself.
    kept = priv.loop.run(get_completion(priv.state.store, stored))
    assert kept is not None and kept.messages[0]["content"] == PROMPT and kept.choices[0].text == REPLY


def test_without_pii_redact_the_export_is_verbatim(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(admin_keys=[ADMIN], plugins={"block_plugins": ["pii_redact"]})
    cid = stored_completion(srv, user="erin", principal=None, reply=REPLY)
    assert send(srv, ADMIN, completion_id=cid, kind="thumbs", choice=0, value="up").status_code == 201
    text = httpx.get(f"{srv.url}/v1/feedback/export", params={"format": "kto"}, headers=bearer(ADMIN)).text
    assert "jane.doe@example.com" in text and "bob.smith@example.org" in text


class _Upper:
    @hookimpl
    def redact_text(self, text: str) -> str:
        return text.upper()


class _Last:
    @hookimpl(trylast=True)
    def redact_text(self, text: str) -> str | None:
        return text.replace("[email]", "<gone>") if "[email]" in text else None  # None: unchanged


def test_redactors_chain_and_never_change_the_originals() -> None:
    pm = make_plugin_manager(load_settings({"plugins": {"allow_plugins": ["pii_redact"]}}, environ={}))
    redactor = Redactor(pm.hook.redact_text)
    assert redactor.text("x jo@example.com") == "x [email]"
    pm.register(_Upper(), name="upper")  # registered later: pluggy calls it before pii_redact
    assert redactor.text("x jo@example.com") == "X [email]", "pii_redact masked what upper returned"
    pm.register(_Last(), name="last")
    assert redactor.text("x jo@example.com") == "X <gone>"
    assert redactor.text("plain") == "PLAIN"

    completion = CompletionRecord(
        id="chatcmpl-1", created=datetime.now(UTC), model="alignd", policy_version=0, params={}, user="u",
        messages=[{"role": "user", "content": [{"type": "text", "text": "me@example.com"}]}], metadata=None,
        prompt_tokens=1, completion_tokens=1, latency_ms=1.0, stream=False,
        choices=[ChoiceRecord(index=0, text="you@example.com", token_ids=[1], finish_reason="stop")])
    event = Feedback(id="fb-1", completion_id="chatcmpl-1", kind="thumbs", payload=ThumbsFeedback(value="up"),
                     user="u", comment="c@example.com", tags=[], idempotency_key=None, created=datetime.now(UTC))
    signal = Signal(pairs=[PreferencePair(prompt=completion.messages, chosen="a@example.com", rejected="b")])
    before = msgspec.json.encode([completion, event, signal])
    out = redactor.sink_arguments({"feedback": event, "completion": completion, "signal": signal, "context": None})
    assert msgspec.json.encode([completion, event, signal]) == before, "the originals are untouched"
    sent = msgspec.json.encode([out["feedback"], out["completion"], out["signal"]]).decode()
    assert "example.com" not in sent.lower()
    assert out["completion"].messages[0]["content"][0]["text"] == "<gone>" and out["feedback"].comment == "<gone>"


# --- the webhook's signature -------------------------------------------------------------------------------------


def test_webhook_signature_verifies_and_a_replay_or_a_tampered_body_is_refused(
        priv: AppServer, receiver: tuple[str, type[Receiver]]) -> None:
    url, hook = receiver
    cid = chat(priv, WEB, user="frank")
    [event, _] = judge(priv, WEB, cid)
    headers, body = wait_for(lambda: next(((h, b) for h, b in hook.accepted if json.loads(b)["id"] == event), None))
    assert LEGACY_SIGNATURE_HEADER not in headers, "the replayable signature is off by default"
    timestamp = int(headers[TIMESTAMP_HEADER])
    assert abs(time.time() - timestamp) < 60
    assert headers[SIGNATURE_HEADER] == sign(SECRET, body, timestamp)

    signed = {name: headers[name] for name in (TIMESTAMP_HEADER, SIGNATURE_HEADER, "X-Alignd-Event")}
    refused = len(hook.refused)

    def replay(content: bytes, extra: dict[str, str] | None = None) -> int:
        return httpx.post(url, content=content, headers={**signed, "content-type": "application/json",
                                                         **(extra or {})}).status_code

    assert replay(body) == 200  # within the window a replay passes; X-Alignd-Event tells the duplicate apart
    hook.skew_s = 301  # five minutes and a second later
    try:
        assert replay(body) == 401 and "old" in hook.refused[-1]
    finally:
        hook.skew_s = 0.0
    tampered = body.replace(b'"value":"up"', b'"value":"down"')
    assert tampered != body and replay(tampered) == 401 and "does not match" in hook.refused[-1]
    assert replay(body, {TIMESTAMP_HEADER: str(timestamp + 1)}) == 401, "the timestamp is signed too"
    assert len(hook.refused) == refused + 3


def test_the_legacy_signature_only_when_asked(make_server: Callable[..., AppServer],
                                               receiver: tuple[str, type[Receiver]]) -> None:
    url, hook = receiver
    srv = make_server(admin_keys=[ADMIN], plugins={"webhook_url": url, "webhook_secret": SECRET,
                                                   "webhook_legacy_signature": True})
    cid = stored_completion(srv, user="gus", principal=None)
    [event, _] = judge(srv, ADMIN, cid)
    headers, body = wait_for(lambda: next(((h, b) for h, b in hook.accepted if json.loads(b)["id"] == event), None))
    legacy = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[LEGACY_SIGNATURE_HEADER], legacy)
    verify(body, headers, SECRET)  # the new headers are there as well


def test_verify_helper() -> None:
    body, now = b'{"id":"fb-1"}', 1_750_000_000
    good = {TIMESTAMP_HEADER.lower(): str(now), SIGNATURE_HEADER.upper(): sign("s1", body, now)}
    verify(body, good, "s1", now=now + 299)
    verify(body, good, ["s0", "s1"], now=now)  # rotating: the old secret or the new
    for headers, secret, at, reason in [
        (good, "s1", now + 301, "old"),
        (good, "s1", now - 301, "in the future"),
        (good, "s2", now, "does not match"),
        ({SIGNATURE_HEADER: good[SIGNATURE_HEADER.upper()]}, "s1", now, TIMESTAMP_HEADER),
        ({TIMESTAMP_HEADER: "soon", SIGNATURE_HEADER: "x"}, "s1", now, "not a Unix time"),
        ({TIMESTAMP_HEADER: str(now)}, "s1", now, SIGNATURE_HEADER),
        ({TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: "sha256=" + "0" * 64}, "s1", now, "does not match"),
    ]:
        with pytest.raises(WebhookVerificationError, match=reason):
            verify(body, headers, secret, now=at)
    with pytest.raises(WebhookVerificationError):
        verify(body + b" ", good, "s1", now=now)
    with pytest.raises(ValueError):
        verify(body, good, "", now=now)
    verify(body, good, "s1", now=now + 1000, tolerance_s=3600)


# --- per-user deletion -------------------------------------------------------------------------------------------


def test_deleting_a_user_removes_every_row_of_theirs_and_nothing_else(priv: AppServer) -> None:
    own = chat(priv, ALICE)  # principal alice, user alice
    via_web = chat(priv, WEB, user="alice")  # principal web, user alice
    bobs = chat(priv, WEB, user="bob")
    alice_events = judge(priv, ALICE, own) + judge(priv, ADMIN, via_web)  # the admin's events inherit the user
    on_bobs = judge(priv, WEB, bobs, user="alice")  # Alice's feedback on Bob's completion
    bob_events = judge(priv, WEB, bobs)
    cached = send(priv, ALICE, completion_id=own, kind="rating", choice=0, score=9)  # the completion is in memory
    assert cached.status_code == 201
    alice_events.append(cached.json()["id"])
    held = rows_of(priv, "alice", [own, via_web], alice_events + on_bobs)
    assert held["completions"] >= 2 and held["feedback"] >= 7
    shown = httpx.get(f"{priv.url}/v1/admin/users/alice", headers=bearer(ADMIN))
    assert shown.status_code == 200 and shown.json()["rows"] == held, shown.text
    before = table_counts(priv)

    r = httpx.delete(f"{priv.url}/v1/admin/users/alice", headers=bearer(ADMIN))

    assert r.status_code == 200, r.text
    assert r.json() == {"user": "alice", "principal": None, "deleted": held, "object": "user.deletion"}
    after = table_counts(priv)
    assert {name: before[name] - after[name] for name in TABLES} == held, "exactly those rows went"
    assert rows_of(priv, "alice", [own, via_web], alice_events + on_bobs) == dict.fromkeys(TABLES, 0)
    assert rows_of(priv, "bob", [bobs], bob_events)["feedback"] == len(bob_events), "Bob's rows stay"
    assert httpx.delete(f"{priv.url}/v1/admin/users/alice", headers=bearer(ADMIN)).json()["deleted"] == \
        dict.fromkeys(TABLES, 0), "idempotent"
    assert_openai_error(httpx.get(f"{priv.url}/v1/admin/users/alice", headers=bearer(ADMIN)), 404,
                        "invalid_request_error", "user_not_found")
    # Feedback on a deleted completion is a 404, even though this process had it in memory.
    assert_openai_error(send(priv, ALICE, completion_id=own, kind="rating", choice=0, score=2), 404,
                        "invalid_request_error", "not_found")
    assert table_counts(priv) == after
    assert metric(priv, 'alignd_deleted_rows_total{reason="user",table="completions"}') >= 2


def test_user_deletion_refusals_change_nothing(priv: AppServer) -> None:
    chat(priv, WEB, user="heidi")
    before = table_counts(priv)
    for key, status, type_, code in ((ALICE, 403, "permission_error", "insufficient_permissions"),
                                     (WEB, 403, "permission_error", "insufficient_permissions"),
                                     ("wrong-key", 401, "authentication_error", "invalid_api_key")):
        for method in ("GET", "DELETE"):
            r = httpx.request(method, f"{priv.url}/v1/admin/users/heidi", headers=bearer(key))
            assert_openai_error(r, status, type_, code)
    r = httpx.delete(f"{priv.url}/v1/admin/users/heidi", params={"principal": "not a name"}, headers=bearer(ADMIN))
    assert assert_openai_error(r, 422, "invalid_request_error", None)["param"] == "principal"
    r = httpx.delete(f"{priv.url}/v1/admin/users/heidi", params={"since": "2024"}, headers=bearer(ADMIN))
    assert assert_openai_error(r, 422, "invalid_request_error", None)["param"] == "since"
    r = httpx.delete(f"{priv.url}/v1/admin/users/{'x' * 300}", headers=bearer(ADMIN))
    assert assert_openai_error(r, 422, "invalid_request_error", None)["param"] == "user"
    assert table_counts(priv) == before


def test_user_deletion_by_principal_and_through_the_sdk_and_the_cli(priv: AppServer) -> None:
    user = "ivan/ü @x"  # any string: the SDK percent-encodes it, "/" included
    via_web = chat(priv, WEB, user=user)
    stored = stored_completion(priv, user=user, principal="other-frontend")
    with Client(priv.url, api_key=ADMIN) as client:
        assert client.users.get(user).rows.completions == 2
        assert client.users.get(user, principal="web").rows.completions == 1
        deleted = client.users.delete(user, principal="web")
        assert (deleted.principal, deleted.deleted.completions, deleted.deleted.choices) == ("web", 1, 2)
        assert client.users.get(user).rows.completions == 1
        with pytest.raises(NotFoundError):
            client.users.get(user, principal="web")
    assert priv.loop.run(get_completion(priv.state.store, via_web)) is None
    with Client(priv.url, api_key=WEB) as client, pytest.raises(PermissionDeniedError):
        client.users.delete(user)

    shown = cli("users", "show", user, "--url", priv.url, "--admin-key", ADMIN, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["rows"]["completions"] == 1, shown.stderr
    done = cli("users", "delete", user, "--url", priv.url, "--admin-key", ADMIN)
    assert done.returncode == 0 and "deleted 1 completions, 2 choices" in done.stdout, done.stderr
    assert priv.loop.run(get_completion(priv.state.store, stored)) is None
    missing = cli("users", "show", user, "--url", priv.url, "--admin-key", ADMIN)
    assert missing.returncode == 1 and "404 No stored completions or feedback" in missing.stderr


async def test_the_async_client(priv: AppServer) -> None:
    stored_completion(priv, user="mia", principal="web", age=timedelta(days=400))
    async with AsyncClient(priv.url, api_key=ADMIN) as client:
        assert (await client.users.get("mia")).rows.choices == 2
        assert (await client.users.get("mia", principal="web")).rows.completions == 1
        assert (await client.retention.run(older_than_days=365)).deleted.completions >= 1
        with pytest.raises(NotFoundError):
            await client.users.get("mia")
        assert (await client.users.delete("mia", principal="web")).deleted == RowCounts(
            completions=0, choices=0, feedback=0, preference_pairs=0, labels=0)


# --- retention ---------------------------------------------------------------------------------------------------


def test_retention_now_deletes_what_is_older_and_keeps_the_rest(priv: AppServer) -> None:
    old = stored_completion(priv, user="judy", principal="web", age=timedelta(days=40))
    old_event = stored_feedback(priv, old, user="judy", age=timedelta(days=39))
    recent = chat(priv, WEB, user="judy")
    recent_events = judge(priv, WEB, recent)
    with Client(priv.url, api_key=ADMIN) as client:
        with pytest.raises(UnprocessableEntityError) as refused:
            client.retention.run()  # no --retain-days on this server, and no days given
        assert refused.value.code == "retention_off" and refused.value.param == "older_than_days"
        run = client.retention.run(older_than_days=30)
    assert run.older_than_days == 30 and run.deleted.completions >= 1 and run.deleted.feedback >= 1
    assert rows_of(priv, "nobody", [old], [old_event]) == dict.fromkeys(TABLES, 0)
    assert rows_of(priv, "nobody", [recent], recent_events)["feedback"] == 2, "newer rows stay"
    before = table_counts(priv)
    for body, status in (({"older_than_days": 0}, 422), ({"days": 3}, 422)):
        r = httpx.post(f"{priv.url}/v1/admin/retention", json=body, headers=bearer(ADMIN))
        assert_openai_error(r, status, "invalid_request_error", None)
    assert_openai_error(httpx.post(f"{priv.url}/v1/admin/retention", json={"older_than_days": 1},
                                   headers=bearer(WEB)), 403, "permission_error", "insufficient_permissions")
    assert table_counts(priv) == before
    done = cli("retention", "run", "--older-than-days", "30", "--url", priv.url, "--admin-key", ADMIN, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["deleted"]["completions"] == 0, done.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_retention_runs_on_its_own_schedule(make_server: Callable[..., AppServer], request: pytest.FixtureRequest,
                                            backend: str) -> None:
    database = None
    if backend == "postgresql":
        database = create_pg_database(request.getfixturevalue("postgres_server_url"),
                                      f"retention_{uuid.uuid4().hex[:8]}")
    srv = make_server(admin_keys=[ADMIN], database=database, store={"retain_days": 30, "retention_interval_s": 0.2})
    old = [stored_completion(srv, user="kim", principal=None, age=timedelta(days=31 + n)) for n in range(3)]
    events = [stored_feedback(srv, cid, user="kim", age=timedelta(days=31)) for cid in old]
    recent = stored_completion(srv, user="kim", principal=None, age=timedelta(days=29))
    kept = stored_feedback(srv, recent, user="kim", age=timedelta(days=1))
    wait_for(lambda: rows_of(srv, "nobody", old, events) == dict.fromkeys(TABLES, 0))
    assert rows_of(srv, "nobody", [recent], [kept]) == {"completions": 1, "choices": 2, "feedback": 1,
                                                        "preference_pairs": 1, "labels": 1}
    assert metric(srv, 'alignd_deleted_rows_total{reason="retention",table="completions"}') >= 3
    assert metric(srv, "alignd_retention_last_success_timestamp_seconds") > 0
    with Client(srv.url, api_key=ADMIN) as client:
        assert client.retention.run().older_than_days == 30  # the configured period by default


def test_feedback_on_a_completion_another_replica_deleted_is_a_404(make_server: Callable[..., AppServer],
                                                                   postgres_server_url: str) -> None:
    database = create_pg_database(postgres_server_url, f"replicas_{uuid.uuid4().hex[:8]}")
    first, second = (make_server(admin_keys=[ADMIN], database=database) for _ in range(2))
    cid = stored_completion(first, user="lena", principal=None)
    assert send(first, ADMIN, completion_id=cid, kind="thumbs", choice=0, value="up").status_code == 201  # cached
    r = httpx.delete(f"{second.url}/v1/admin/users/lena", headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json()["deleted"]["completions"] == 1, r.text
    before = table_counts(first)
    assert_openai_error(send(first, ADMIN, completion_id=cid, kind="thumbs", choice=1, value="down"), 404,
                        "invalid_request_error", "not_found")
    assert table_counts(first) == before
