"""Identity and ownership, through real HTTP against the real engine: keys stand for principals (user, frontend,
admin); a user key's completions and feedback are its own and its identity cannot be overridden in the body; a
frontend names its users and judges its own completions only; operator routes take admin keys; keys are added and
revoked at run time, stored hashed (SQLite, and PostgreSQL shared by two replicas) and compared in constant time.
Every refusal is an OpenAI-shaped 4xx that changes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from alignd import keys as keys_module
from alignd.clients import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    PermissionDeniedError,
)
from alignd.config import ConfigError, ServerSettings, load_settings
from alignd.keys import KeyRing, config_keys, digest, generate_key
from alignd.protocol import ApiKeyCreated
from alignd.store import KeyRow, Store
from alignd.store.tables import api_keys
from tests.engine_fixtures import create_pg_database
from tests.serverkit import AppServer
from tests.store_reads import count_completions, get_completion
from tests.test_security import _serve, assert_openai_error, bearer
from tests.test_store import make_record

HELLO = [{"role": "user", "content": "What should I plant in spring?"}]
ADMIN, LEGACY, WEB, ALICE, BOB, SCRAPE = (
    "admin-key-4f1c",
    "legacy-api-key-9d2e",
    "web-frontend-key-77aa",
    "alice-user-key-c3b0",
    "bob-user-key-e81f",
    "scrape-key-5b6d",
)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def keyed(make_server: Callable[..., AppServer]) -> AppServer:
    """Every kind of key: --api-key (principal 'api', frontend), --admin-key, named keys (Bob's configured by its
    digest), a metrics key, and a plugin route for the client API's callers."""
    return make_server(
        api_keys=[LEGACY],
        admin_keys=[ADMIN],
        metrics_keys=[SCRAPE],
        keys=[f"web:frontend:{WEB}", f"alice:user:{ALICE}", f"bob:user:sha256:{digest(BOB)}"],
        plugins={"plugin_modules": ["tests.feedback_plugins:stars"]},
    )


class Unchanged:
    """Asserts that what runs inside stores no completion, feedback event or key and hands nothing to the
    engine."""

    def __init__(self, srv: AppServer) -> None:
        self.srv = srv

    def _state(self) -> tuple[Any, ...]:
        store = self.srv.state.store
        return (
            self.srv.loop.run(count_completions(store)),
            self.srv.loop.run(store.count_feedback()),
            len(self.srv.loop.run(store.list_keys())),
            self.srv.state.metrics.engine_requests._value.get(),
        )

    def __enter__(self) -> Unchanged:
        self.before = self._state()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert self._state() == self.before, "a refused request changed something"


# --- roles and ownership -----------------------------------------------------------------------------------------


def test_a_user_key_owns_its_completions(keyed: AppServer) -> None:
    cid = _complete(keyed, ALICE)
    completion = keyed.loop.run(get_completion(keyed.state.store, cid))
    assert completion is not None and (completion.principal, completion.user) == ("alice", "alice")
    created = _feedback(keyed, ALICE, cid)
    assert created.status_code == 201, created.text
    event = _event(keyed, created.json()["id"])
    assert (event.user, event.principal) == ("alice", "alice")
    with Unchanged(keyed):
        for key in (BOB, WEB, LEGACY):  # another user, a frontend, the --api-key principal
            error = assert_openai_error(_feedback(keyed, key, cid), 403, "permission_error", "not_your_completion")
            assert error["param"] == "completion_id" and "alice" not in error["message"]  # the owner stays private
    by_admin = _feedback(keyed, ADMIN, cid, value="down")
    assert by_admin.status_code == 201, by_admin.text
    assert _event(keyed, by_admin.json()["id"]).principal == "admin"


def test_a_user_keys_identity_cannot_be_overridden_in_the_body(keyed: AppServer) -> None:
    with Unchanged(keyed):
        error = assert_openai_error(_chat(keyed, ALICE, user="bob"), 403, "permission_error", "user_not_allowed")
        assert error["param"] == "user"
        sdk = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=ALICE, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            sdk.chat.completions.create(model="alignd", messages=HELLO, max_tokens=2, user="bob")
    cid = _complete(keyed, ALICE, user="alice")  # naming itself is fine
    with Unchanged(keyed):
        error = assert_openai_error(
            _feedback(keyed, ALICE, cid, user="bob"), 403, "permission_error", "user_not_allowed"
        )
        assert error["param"] == "user"
    assert _feedback(keyed, ALICE, cid, user="alice").status_code == 201


def test_a_frontend_names_its_users_and_judges_only_its_own_completions(keyed: AppServer) -> None:
    cid = _complete(keyed, WEB, user="carol")
    completion = keyed.loop.run(get_completion(keyed.state.store, cid))
    assert completion is not None and (completion.principal, completion.user) == ("web", "carol")
    named = _feedback(keyed, WEB, cid, user="carol")
    unnamed = _feedback(keyed, WEB, cid, value="down", choice=0)
    assert named.status_code == unnamed.status_code == 201
    assert [_event(keyed, r.json()["id"]).user for r in (named, unnamed)] == ["carol", "carol"]
    other = _complete(keyed, LEGACY, user="dan")  # through another frontend (the --api-key principal)
    with Unchanged(keyed):
        for key, target in ((ALICE, cid), (LEGACY, cid), (WEB, other)):
            assert_openai_error(_feedback(keyed, key, target), 403, "permission_error", "not_your_completion")


def test_completions_made_before_keys_had_identities_are_for_admins(keyed: AppServer) -> None:
    """A row an earlier alignd (or an open server) stored has no principal: only an admin may judge it."""
    old = make_record(
        int(uuid.uuid4().int % 1_000_000), id=f"chatcmpl-old-{uuid.uuid4().hex}", created=datetime.now(UTC)
    )
    keyed.loop.run(keyed.state.store.record_completion(old))
    with Unchanged(keyed):
        for key in (ALICE, WEB, LEGACY):
            assert_openai_error(_feedback(keyed, key, old.id), 403, "permission_error", "not_your_completion")
    assert _feedback(keyed, ADMIN, old.id).status_code == 201


def test_an_unknown_completion_is_a_404_for_everyone(keyed: AppServer) -> None:
    with Unchanged(keyed):
        for key in (ALICE, WEB, ADMIN):
            assert_openai_error(_feedback(keyed, key, "chatcmpl-nope"), 404, "invalid_request_error", "not_found")


def test_idempotency_keys_do_not_cross_principals(keyed: AppServer) -> None:
    mine, theirs = _complete(keyed, ALICE), _complete(keyed, BOB)
    key = f"shared-{uuid.uuid4().hex}"
    first = _feedback(keyed, ALICE, mine, idempotency_key=key)
    assert first.status_code == 201
    with Unchanged(keyed):
        error = assert_openai_error(
            _feedback(keyed, BOB, theirs, idempotency_key=key), 409, "invalid_request_error", "idempotency_key_reused"
        )
        assert first.json()["id"] not in error["message"]
    replay = _feedback(keyed, ALICE, mine, idempotency_key=key)
    assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"


def test_plugin_routes_store_feedback_for_their_caller(keyed: AppServer) -> None:
    cid = _complete(keyed, ALICE)
    url = f"{keyed.url}/v1/plugins/stars/star"
    with Unchanged(keyed):
        r = httpx.post(url, json={"completion_id": cid}, headers=bearer(BOB), timeout=30)
        assert_openai_error(r, 403, "permission_error", "not_your_completion")
        assert_openai_error(
            httpx.post(url, json={"completion_id": cid}, timeout=30), 401, "authentication_error", "invalid_api_key"
        )
    r = httpx.post(url, json={"completion_id": cid}, headers=bearer(ALICE), timeout=30)
    assert r.status_code == 201, r.text
    assert _event(keyed, r.json()["feedback_id"]).principal == "alice"


# --- operators and metrics ---------------------------------------------------------------------------------------

OPERATOR_ROUTES = [
    ("GET", "/v1/policies"),
    ("POST", "/v1/policies/0/promote"),
    ("POST", "/v1/policies/rollback"),
    ("GET", "/v1/training/runs"),
    ("POST", "/v1/training/runs"),
    ("GET", "/v1/feedback"),
    ("GET", "/v1/feedback/export"),
    ("GET", "/v1/feedback/stats"),
    ("GET", "/v1/plugins"),
    ("GET", "/v1/admin/keys"),
    ("POST", "/v1/admin/keys"),
    ("GET", "/v1/admin/keys/config-key-1"),
    ("DELETE", "/v1/admin/keys/config-key-1"),
]


def test_operator_routes_take_admin_keys_only(keyed: AppServer) -> None:
    runs = httpx.get(f"{keyed.url}/v1/training/runs", headers=bearer(ADMIN)).json()["data"]
    with Unchanged(keyed):
        for method, path in OPERATOR_ROUTES:
            body = {"name": "mallory", "role": "admin"} if method == "POST" else None
            for key in (ALICE, WEB, LEGACY):
                r = httpx.request(method, f"{keyed.url}{path}", json=body, headers=bearer(key), timeout=30)
                error = assert_openai_error(r, 403, "permission_error", "insufficient_permissions")
                assert "admin key" in error["message"], (method, path)
            for headers in (None, bearer("wrong"), bearer(SCRAPE)):
                r = httpx.request(method, f"{keyed.url}{path}", json=body, headers=headers, timeout=30)
                assert_openai_error(r, 401, "authentication_error", "invalid_api_key")
    assert httpx.get(f"{keyed.url}/v1/training/runs", headers=bearer(ADMIN)).json()["data"] == runs
    for method, path in OPERATOR_ROUTES:
        if method == "GET":
            assert httpx.get(f"{keyed.url}{path}", headers=bearer(ADMIN), timeout=30).status_code == 200, path


def test_metrics_take_a_metrics_frontend_or_admin_key(keyed: AppServer) -> None:
    for key in (SCRAPE, WEB, LEGACY, ADMIN):
        r = httpx.get(f"{keyed.url}/metrics", headers=bearer(key))
        assert r.status_code == 200 and "alignd_requests_total" in r.text, key
    error = assert_openai_error(
        httpx.get(f"{keyed.url}/metrics", headers=bearer(ALICE)), 403, "permission_error", "insufficient_permissions"
    )
    assert "user key" in error["message"]
    for headers in (None, bearer("wrong")):
        assert_openai_error(
            httpx.get(f"{keyed.url}/metrics", headers=headers), 401, "authentication_error", "invalid_api_key"
        )
    with Unchanged(keyed):  # the metrics key reads /metrics and nothing else
        assert_openai_error(_chat(keyed, SCRAPE), 401, "authentication_error", "invalid_api_key")
        assert httpx.get(f"{keyed.url}/v1/models", headers=bearer(SCRAPE)).status_code == 401


def test_a_metrics_key_guards_metrics_on_an_open_server(make_server: Callable[..., AppServer]) -> None:
    srv = make_server(metrics_keys=[SCRAPE])
    assert httpx.get(f"{srv.url}/metrics").status_code == 401
    assert httpx.get(f"{srv.url}/metrics", headers=bearer(SCRAPE)).status_code == 200
    assert _chat(srv, None).status_code == 200  # the client API stays open


# --- keys at run time --------------------------------------------------------------------------------------------


def test_keys_are_added_and_revoked_at_run_time_and_stored_hashed(keyed: AppServer) -> None:
    r = _add_key(keyed, "erin", "user")
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    key, key_id = created["key"], created["id"]
    assert key.startswith("alignd-") and key_id in key and len(key) > 60
    assert (created["name"], created["role"], created["source"], created["created_by"], created["revoked"]) == (
        "erin",
        "user",
        "database",
        "admin",
        None,
    )
    # Usable at once, no restart.
    cid = _complete(keyed, key)
    assert keyed.loop.run(get_completion(keyed.state.store, cid)).principal == "erin"
    assert _feedback(keyed, key, cid).status_code == 201
    # Listed without the key; in the database only its SHA-256.
    listing = httpx.get(f"{keyed.url}/v1/admin/keys", headers=bearer(ADMIN))
    assert key not in listing.text and key[-20:] not in listing.text
    [entry] = [k for k in listing.json()["data"] if k["id"] == key_id]
    assert "key" not in entry and entry["name"] == "erin"
    assert {k["id"]: k["source"] for k in listing.json()["data"]}["config-key-2"] == "config"
    [row] = keyed.loop.run(_rows(keyed.state.store, key_id))
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert all(key not in str(value) and key.split("-")[-1] not in str(value) for value in row.values())
    # Revoked: refused at once, everywhere a key is taken.
    revoked = httpx.delete(f"{keyed.url}/v1/admin/keys/{key_id}", headers=bearer(ADMIN))
    assert revoked.status_code == 200 and revoked.json()["revoked"] and revoked.json()["revoked_by"] == "admin"
    with Unchanged(keyed):
        assert_openai_error(_chat(keyed, key), 401, "authentication_error", "invalid_api_key")
        assert_openai_error(_feedback(keyed, key, cid), 401, "authentication_error", "invalid_api_key")
    again = httpx.delete(f"{keyed.url}/v1/admin/keys/{key_id}", headers=bearer(ADMIN))
    assert again.status_code == 200 and again.json()["revoked"] == revoked.json()["revoked"]
    assert httpx.get(f"{keyed.url}/v1/admin/keys/{key_id}", headers=bearer(ADMIN)).json()["revoked"]


def test_a_new_key_for_a_principal_shares_its_completions(keyed: AppServer) -> None:
    """Rotation: a second key for 'alice' is the same principal."""
    cid = _complete(keyed, ALICE)
    r = _add_key(keyed, "alice", "user")
    assert r.status_code == 201, r.text
    assert _feedback(keyed, r.json()["key"], cid).status_code == 201


def test_key_administration_refusals_change_nothing(keyed: AppServer) -> None:
    frank = _add_key(keyed, "frank", "user").json()
    httpx.delete(f"{keyed.url}/v1/admin/keys/{frank['id']}", headers=bearer(ADMIN))
    listing = httpx.get(f"{keyed.url}/v1/admin/keys", headers=bearer(ADMIN)).json()
    with Unchanged(keyed):
        for body, param in (
            ({"name": "x", "role": "root"}, "role"),
            ({"name": "bad name!", "role": "user"}, "name"),
            ({"name": "", "role": "user"}, "name"),
            ({"role": "user"}, "name"),
            ({"name": "x", "role": "user", "scope": "all"}, "scope"),
        ):
            r = httpx.post(f"{keyed.url}/v1/admin/keys", json=body, headers=bearer(ADMIN))
            assert r.status_code == 422 and r.json()["error"]["param"] == param, (body, r.text)
        r = httpx.post(
            f"{keyed.url}/v1/admin/keys", content=b"{", headers={**bearer(ADMIN), "content-type": "application/json"}
        )
        assert r.status_code == 400
        # A name keeps its role: a configured one, the --api-key and --admin-key principals, a revoked one's.
        for name, role in (
            ("alice", "frontend"),
            ("api", "user"),
            ("admin", "frontend"),
            ("web", "admin"),
            ("frank", "frontend"),
        ):
            error = assert_openai_error(
                _add_key(keyed, name, role), 409, "invalid_request_error", "principal_role_conflict"
            )
            assert error["param"] == "role"
        assert_openai_error(
            httpx.delete(f"{keyed.url}/v1/admin/keys/config-key-1", headers=bearer(ADMIN)),
            409,
            "invalid_request_error",
            "configured_key",
        )
        assert_openai_error(
            httpx.delete(f"{keyed.url}/v1/admin/keys/0123456789abcdef", headers=bearer(ADMIN)),
            404,
            "invalid_request_error",
            "not_found",
        )
    assert httpx.get(f"{keyed.url}/v1/admin/keys", headers=bearer(ADMIN)).json() == listing
    assert _chat(keyed, WEB).status_code == 200, "configured keys work on"


def test_the_client_api_closes_once_a_client_key_exists(make_server: Callable[..., AppServer]) -> None:
    """An open server (an admin key, no client keys) serves anonymous callers, as before; a user key added at run
    time closes it at once, and revoking the last client key opens it again."""
    srv = make_server(admin_keys=[ADMIN])
    anonymous = _complete(srv, None)
    assert _chat(srv, "unused").status_code == 200  # the openai SDK always sends some key
    assert _feedback(srv, None, anonymous).status_code == 201  # open: nothing is owned
    created = _add_key(srv, "gina", "user").json()
    with Unchanged(srv):
        for key in (None, "unused"):
            assert_openai_error(_chat(srv, key), 401, "authentication_error", "invalid_api_key")
        assert_openai_error(httpx.get(f"{srv.url}/metrics"), 401, "authentication_error", "invalid_api_key")
    mine = _complete(srv, created["key"])
    assert_openai_error(_feedback(srv, created["key"], anonymous), 403, "permission_error", "not_your_completion")
    assert _feedback(srv, created["key"], mine).status_code == 201
    assert httpx.delete(f"{srv.url}/v1/admin/keys/{created['id']}", headers=bearer(ADMIN)).status_code == 200
    assert _chat(srv, None).status_code == 200


def test_an_admin_key_in_the_database_runs_the_server(make_server: Callable[..., AppServer], tmp_path: Path) -> None:
    """No admin key configured: one stored in the database is the operator; the last admin key cannot be revoked."""
    database = f"sqlite:///{tmp_path / 'keys.db'}"
    first_id, first = generate_key()

    async def seed() -> None:
        async with await Store.open(database) as store:
            await store.insert_key(
                KeyRow(
                    id=first_id,
                    name="ops",
                    role="admin",
                    key_hash=digest(first),
                    created=datetime.now(UTC),
                    created_by=None,
                )
            )

    asyncio.run(seed())
    srv = make_server(database=database)
    assert httpx.get(f"{srv.url}/v1/policies", headers=bearer(first)).status_code == 200
    second = _add_key(srv, "ops", "admin", admin=first).json()
    revoked = httpx.delete(f"{srv.url}/v1/admin/keys/{first_id}", headers=bearer(second["key"]))
    assert revoked.status_code == 200 and revoked.json()["revoked_by"] == "ops"
    assert httpx.get(f"{srv.url}/v1/policies", headers=bearer(first)).status_code == 401
    with Unchanged(srv):
        r = httpx.delete(f"{srv.url}/v1/admin/keys/{second['id']}", headers=bearer(second["key"]))
        assert_openai_error(r, 409, "invalid_request_error", "last_admin_key")
    assert httpx.get(f"{srv.url}/v1/policies", headers=bearer(second["key"])).status_code == 200


def test_replicas_on_postgresql_agree_on_keys(make_server: Callable[..., AppServer], postgres_server_url: str) -> None:
    """Keys live in the database: one added on a replica works on the other at once; one revoked there is refused
    there at once and here within --key-cache-s."""
    database = create_pg_database(postgres_server_url, f"keys_{uuid.uuid4().hex[:8]}")
    here = make_server(database=database, admin_keys=[ADMIN], key_cache_s=0.5)
    there = make_server(database=database, admin_keys=[ADMIN], key_cache_s=0.5)
    hana = _add_key(there, "hana", "user").json()
    ivan = _add_key(there, "ivan", "user").json()
    cid = _complete(here, hana["key"])
    assert _feedback(there, hana["key"], cid).status_code == 201
    assert_openai_error(_feedback(there, ivan["key"], cid), 403, "permission_error", "not_your_completion")
    assert _chat(here, hana["key"]).status_code == 200  # cached here now
    assert httpx.delete(f"{there.url}/v1/admin/keys/{hana['id']}", headers=bearer(ADMIN)).status_code == 200
    revoked_at = time.monotonic()
    assert _chat(there, hana["key"]).status_code == 401
    while _chat(here, hana["key"]).status_code != 401:
        assert time.monotonic() - revoked_at < 0.5 + 2.0, "the other replica still takes the revoked key"
        time.sleep(0.05)
    listed = {k["name"] for k in httpx.get(f"{here.url}/v1/admin/keys", headers=bearer(ADMIN)).json()["data"]}
    assert {"hana", "ivan"} <= listed


# --- how keys are compared ---------------------------------------------------------------------------------------


def test_keys_are_compared_in_constant_time(keyed: AppServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Digests of equal length, compared with hmac.compare_digest, every configured one, match or not."""
    calls: list[tuple[int, int]] = []

    def compare_digest(a: str, b: str) -> bool:
        calls.append((len(a), len(b)))
        return a == b

    monkeypatch.setattr(keys_module, "hmac", SimpleNamespace(compare_digest=compare_digest))
    ring: KeyRing = keyed.state.keys
    configured = len(ring.configured)
    stored = _add_key(keyed, "judy", "user").json()["key"]
    for token, principal, compared in (
        ("wrong", None, configured),
        (LEGACY, "api", configured),
        (BOB, "bob", configured),
        (stored, "judy", configured + 1),
        (stored[:-1] + ("A" if stored[-1] != "A" else "B"), None, configured + 1),
    ):
        calls.clear()
        found = keyed.loop.run(ring.identify(token))
        assert (found.name if found else None) == principal, token
        assert len(calls) == compared and set(calls) == {(64, 64)}, (token, calls)


async def test_a_configured_name_with_another_role_in_the_database_stops_the_start(tmp_path: Path) -> None:
    async with await Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store:
        key_id, key = generate_key()
        await store.insert_key(
            KeyRow(
                id=key_id, name="kim", role="frontend", key_hash=digest(key), created=datetime.now(UTC), created_by=None
            )
        )
        await KeyRing(store, ServerSettings(keys=["kim:frontend:k1"])).check_store()  # same role: fine
        with pytest.raises(ConfigError, match="kim"):
            await KeyRing(store, ServerSettings(keys=["kim:user:k1"])).check_store()


def test_named_keys_from_the_environment() -> None:
    settings = load_settings(
        {},
        environ={
            "ALIGND_KEY": f"web:frontend:{WEB}, ops:admin:sha256:{'AB' * 32}",
            "ALIGND_API_KEY": LEGACY,
            "ALIGND_METRICS_KEY": SCRAPE,
            "ALIGND_KEY_CACHE_S": "0",
        },
    )
    assert settings.server.key_cache_s == 0
    configured = [
        (k.principal.key_id, k.principal.name, k.principal.role, k.digest) for k in config_keys(settings.server)
    ]
    assert configured == [
        ("config-api-key-1", "api", "frontend", digest(LEGACY)),
        ("config-key-1", "web", "frontend", digest(WEB)),
        ("config-key-2", "ops", "admin", "ab" * 32),
    ]


def test_configured_keys_are_checked_before_anything_starts(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    for args, expected in (
        (["--key", "nonsense"], "NAME:ROLE:KEY"),
        (["--key", "a:root:k"], "NAME:ROLE:KEY"),
        (["--key", "a:user:k1", "--key", "a:admin:k2"], "two roles"),
        (["--api-key", "k", "--key", "api:user:k2"], "two roles"),
        (["--host", "0.0.0.0", "--admin-key", "k"], "--insecure-open"),
        (["--host", "0.0.0.0", "--key", "w:frontend:k"], "does not exist"),
        (["--host", "0.0.0.0", "--key", "u:user:sha256:" + "ab" * 32], "does not exist"),
    ):
        done, _ = _serve(tmp_path, "--model", missing, *args)
        assert done.returncode == 2 and expected in done.stderr, (args, done.stderr)


# --- SDK and CLI -------------------------------------------------------------------------------------------------


def test_sdk_manages_keys(keyed: AppServer) -> None:
    with Client(keyed.url, api_key=ADMIN, max_retries=0) as admin:
        created = admin.keys.create("kate", "user")
        assert isinstance(created, ApiKeyCreated) and created.key.startswith("alignd-")
        assert created.id in {k.id for k in admin.keys.list().data}
        assert admin.keys.get(created.id).name == "kate"
        with Client(keyed.url, api_key=created.key, max_retries=0) as kate:
            assert kate.chat(HELLO, max_tokens=2).choices
            with pytest.raises(PermissionDeniedError):
                kate.keys.list()
            with pytest.raises(ConflictError) as conflict:
                admin.keys.create("kate", "admin")
            assert conflict.value.code == "principal_role_conflict"
            assert admin.keys.revoke(created.id).revoked is not None
            with pytest.raises(AuthenticationError):
                kate.chat(HELLO, max_tokens=2)

    async def listed() -> list[str]:
        async with AsyncClient(keyed.url, api_key=ADMIN, max_retries=0) as client:
            return [k.name for k in (await client.keys.list()).data]

    assert "kate" in asyncio.run(listed())


def test_cli_manages_keys(keyed: AppServer) -> None:
    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alignd.cli", "keys", *args], capture_output=True, text=True, timeout=60, cwd=REPO
        )

    added = keys("add", "liam", "--role", "frontend", "--url", keyed.url, "--admin-key", ADMIN)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("alignd-") and "shown once" in added.stderr
    assert _chat(keyed, key, user="someone").status_code == 200
    listed = keys("list", "--json", "--url", keyed.url, "--admin-key", ADMIN)
    [liam] = [k for k in json.loads(listed.stdout) if k["name"] == "liam"]
    assert key not in listed.stdout and liam["role"] == "frontend"
    table = keys("list", "--url", keyed.url, "--admin-key", ADMIN)
    assert table.returncode == 0 and "liam" in table.stdout and "config-key-1" in table.stdout
    assert keys("revoke", liam["id"], "--url", keyed.url, "--admin-key", ADMIN).returncode == 0
    assert _chat(keyed, key).status_code == 401
    refused = keys("revoke", "config-key-1", "--url", keyed.url, "--admin-key", ADMIN)
    assert refused.returncode == 1 and "configuration" in refused.stderr
    denied = keys("list", "--url", keyed.url, "--admin-key", ALICE)
    assert denied.returncode == 1 and "admin key" in denied.stderr
    generated = keys("generate")
    raw, hashed = generated.stdout.split()
    assert hashed == f"sha256:{hashlib.sha256(raw.encode()).hexdigest()}"


# --- helpers -----------------------------------------------------------------------------------------------------


def _chat(srv: AppServer, key: str | None, **body: Any) -> httpx.Response:
    body = {"model": "alignd", "messages": HELLO, "max_tokens": 2, **body}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=bearer(key) if key else None, timeout=120)


def _complete(srv: AppServer, key: str | None, **body: Any) -> str:
    r = _chat(srv, key, **body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _feedback(srv: AppServer, key: str | None, completion_id: str, **fields: Any) -> httpx.Response:
    body = {"completion_id": completion_id, "kind": "thumbs", "value": "up", **fields}
    return httpx.post(f"{srv.url}/v1/feedback", json=body, headers=bearer(key) if key else None, timeout=30)


def _add_key(srv: AppServer, name: str, role: str, *, admin: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/admin/keys", json={"name": name, "role": role}, headers=bearer(admin), timeout=30)


def _event(srv: AppServer, feedback_id: str) -> Any:
    [event] = [e for e in srv.loop.run(srv.state.store.list_feedback(limit=10_000)) if e.id == feedback_id]
    return event


async def _rows(store: Store, key_id: str) -> list[dict[str, Any]]:
    async with store.engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(api_keys).where(api_keys.c.id == key_id))]
