"""Database faults under load, through real HTTP on the real engine: PostgreSQL (a cluster of its own) with alignd's
connections terminated mid-write and then stopped and restarted; SQLite on a real, full filesystem (a small tmpfs).

What must hold: every failure a client sees is a 503 in OpenAI's error shape with ``Retry-After`` (a stream already
under way ends with an error event instead of ``[DONE]``), never a 500 or a cut connection; ``/ready`` says so, and
no more; every acknowledged completion and feedback event is stored, whole; the server recovers by itself once the
database is back, with no restart.
"""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from alignd.store.faults import outage
from alignd.store.store import async_url
from tests import pgserver
from tests.engine_fixtures import create_pg_database
from tests.serverkit import AppServer

# An operator key: /metrics and the listing need it; /ready stays open and must tell nothing of the error.
ADMIN = {"authorization": "Bearer admin-key"}
CHAT = {"model": "alignd", "messages": [{"role": "user", "content": "Tell me about bread."}], "max_tokens": 4}


# --- load and its tally ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What clients were told: acknowledged ids, refusals (each checked), and anything else (must stay empty)."""

    completions: set[str] = field(default_factory=set)
    feedback: set[str] = field(default_factory=set)
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (what, error code) of each 503 or error event
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refused(self, response: httpx.Response, what: str) -> None:
        """A failure must be a 503 in OpenAI's shape with Retry-After, naming the database."""
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        error = body.get("error") or {}
        with self.lock:
            if (response.status_code == 503 and response.headers.get("retry-after", "").isdigit()
                    and error.get("type") == "server_error"
                    and error.get("code") in ("database_unavailable", "database_full")):
                self.refusals.append((what, error["code"]))
            else:
                self.unexpected.append(f"{what}: {response.status_code} {response.headers} {response.text[:300]}")

    @property
    def acknowledged(self) -> int:
        return len(self.completions) + len(self.feedback)

    def codes(self) -> set[str]:
        return {code for _, code in self.refusals}

    def refused_what(self) -> set[str]:
        return {what for what, _ in self.refusals}


def _chat(client: httpx.Client, tally: Tally, stream: bool, body: dict | None = None) -> str | None:
    body = {**(body or CHAT), "stream": stream}
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            with tally.lock:
                tally.completions.add(r.json()["id"])
            return r.json()["id"]
        tally.refused(r, "chat")
        return None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            tally.refused(r, "chat stream")
            return None
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-1]) if events and events[-1] != "[DONE]" else None
    with tally.lock:
        if events and events[-1] == "[DONE]":
            completion_id = json.loads(events[0])["id"]
            tally.completions.add(completion_id)
            return completion_id
        if last is not None and (last.get("error") or {}).get("code") in ("database_unavailable", "database_full"):
            tally.refusals.append(("stream event", last["error"]["code"]))  # it said it failed; no [DONE]
        else:
            tally.unexpected.append(f"chat stream ended with {events[-2:]}")
    return None


def _feedback(client: httpx.Client, tally: Tally, completion_id: str) -> None:
    r = client.post("/v1/feedback", json={"completion_id": completion_id, "kind": "thumbs", "choice": 0,
                                          "value": "up"})
    if r.status_code == 201:
        with tally.lock:
            tally.feedback.add(r.json()["id"])
    else:
        tally.refused(r, "feedback")


class Load:
    """Client threads sending chat (plain and streamed) then feedback on each answer, until stopped."""

    def __init__(self, url: str, tally: Tally, workers: int = 3) -> None:
        self.stop = threading.Event()
        self.tally = tally
        self.threads = [threading.Thread(target=self._run, args=(url, i % 3 == 2), daemon=True)
                        for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _run(self, url: str, stream: bool) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while not self.stop.is_set():
                try:
                    completion_id = _chat(client, self.tally, stream)
                    if completion_id is not None:
                        _feedback(client, self.tally, completion_id)
                except (httpx.TransportError, ValueError, KeyError, IndexError) as exc:  # a cut connection, a bad body
                    with self.tally.lock:
                        self.tally.unexpected.append(f"{type(exc).__name__}: {exc}")

    def until(self, condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"load: {what} did not happen ({self.tally})"
            assert not self.tally.unexpected, self.tally.unexpected
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)
            assert not thread.is_alive()


# --- what the database holds -------------------------------------------------------------------------------------


@dataclass
class Stored:
    completions: set[str]
    feedback: set[str]
    without_choices: int
    """Completions stored without their choice: half-written."""
    labels_missing: int
    """Feedback events whose labels are not all stored: half-written."""


def read_stored(url: str) -> Stored:
    async def read() -> Stored:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.connect() as conn:
                completions = set((await conn.execute(text("SELECT id FROM completions"))).scalars())
                feedback = set((await conn.execute(text("SELECT id FROM feedback"))).scalars())
                without_choices = (await conn.execute(text(
                    "SELECT count(*) FROM completions c WHERE NOT EXISTS "
                    "(SELECT 1 FROM choices h WHERE h.completion_id = c.id)"))).scalar_one()
                labels_missing = (await conn.execute(text(
                    "SELECT count(*) FROM feedback f WHERE f.label_count <> "
                    "(SELECT count(*) FROM labels l WHERE l.feedback_id = f.id)"))).scalar_one()
        finally:
            await engine.dispose()
        return Stored(completions, feedback, without_choices, labels_missing)

    return asyncio.run(read())


def check_nothing_acknowledged_lost(tally: Tally, stored: Stored, *, exact: bool) -> None:
    assert not tally.completions - stored.completions, "acknowledged completions not stored"
    assert not tally.feedback - stored.feedback, "acknowledged feedback not stored"
    assert (stored.without_choices, stored.labels_missing) == (0, 0), "half-written rows"
    unacknowledged = len(stored.completions - tally.completions) + len(stored.feedback - tally.feedback)
    print(f"acknowledged {len(tally.completions)} completions and {len(tally.feedback)} feedback events, refused "
          f"{len(tally.refusals)} requests ({sorted(set(tally.refusals))}); stored "
          f"{len(stored.completions)} and {len(stored.feedback)}, {unacknowledged} of them unacknowledged")
    if exact:
        assert unacknowledged == 0
    else:
        # A connection lost during COMMIT leaves its outcome unknown to the server, which answers 503: the row may be
        # stored all the same. Only a refused request can account for a stored row nobody was told of.
        assert unacknowledged <= len(tally.refusals)


def ready(url: str) -> httpx.Response:
    return httpx.get(f"{url}/ready", timeout=30)


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (r := ready(url)).status_code != 200:
        assert time.monotonic() < deadline, f"/ready never recovered: {r.status_code} {r.text}"
        time.sleep(0.2)


def database_errors(url: str, reason: str) -> float:
    for line in httpx.get(f"{url}/metrics", headers=ADMIN, timeout=30).text.splitlines():
        if line.startswith(f'alignd_database_errors_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def recovered(url: str, tally: Tally) -> None:
    """With the database back and no restart: chat (plain and streamed) and feedback succeed at once, and /ready."""
    refusals, acknowledged = len(tally.refusals), tally.acknowledged
    with httpx.Client(base_url=url, timeout=120) as client:
        for stream in (False, True):
            completion_id = _chat(client, tally, stream)
            assert completion_id is not None, tally
            _feedback(client, tally, completion_id)
    assert (tally.acknowledged - acknowledged, len(tally.refusals) - refusals, tally.unexpected) == (4, 0, [])
    wait_ready(url)


# --- PostgreSQL --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[pgserver.PostgresServer]:
    """A cluster these tests may stop: not the session's."""
    try:
        server = pgserver.start_postgres(settings={"fsync": "off", "full_page_writes": "off"})
    except pgserver.PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL is required for these tests and could not be started: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_app(make_server: Callable[..., AppServer], own_postgres: pgserver.PostgresServer
           ) -> Iterator[tuple[AppServer, str]]:
    database = create_pg_database(own_postgres.url, f"faults_{uuid.uuid4().hex[:8]}")
    app = make_server(database=database, admin_keys=["admin-key"])
    yield app, database
    app.stop()


async def _terminate_while_writing(admin_url: str, database: str) -> int:
    """Hold alignd's writes behind a table lock until some are waiting on it, then terminate every connection of
    alignd's to its database (the waiting writes die mid-transaction); returns how many were terminated."""
    admin = await asyncpg.connect(admin_url.replace("/postgres", f"/{database}"))
    try:
        tx = admin.transaction()
        await tx.start()
        await admin.execute("LOCK TABLE completions, feedback IN ACCESS EXCLUSIVE MODE")
        deadline = time.monotonic() + 120
        while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() "
                "AND wait_event_type = 'Lock'", database):
            assert time.monotonic() < deadline, "no write ever waited on the lock"
            await asyncio.sleep(0.02)
        terminated = await admin.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()) t", database)
        await tx.rollback()
        return int(terminated)
    finally:
        await admin.close()


# Operator endpoints that read or write the database: each a 503 while it is down.
OPERATOR_CALLS = [("GET", "/v1/feedback", None), ("GET", "/v1/feedback/stats", None),
                  ("GET", "/v1/feedback/export", None), ("GET", "/v1/training/runs", None),
                  ("POST", "/v1/training/runs", {}), ("GET", "/v1/policies/1", None),
                  ("GET", "/v1/admin/keys", None), ("POST", "/v1/admin/keys", {"name": "ops", "role": "user"}),
                  ("GET", "/v1/admin/users/someone", None), ("DELETE", "/v1/admin/users/someone", None),
                  ("POST", "/v1/admin/retention", {"older_than_days": 30})]


def test_postgres_connections_terminated_mid_write(pg_app: tuple[AppServer, str],
                                                   own_postgres: pgserver.PostgresServer) -> None:
    app, database = pg_app
    name = database.rsplit("/", 1)[1]
    tally = Tally()
    load = Load(app.url, tally)
    try:
        load.until(lambda: tally.acknowledged >= 6, "acknowledgements before the fault")
        terminated = asyncio.run(_terminate_while_writing(own_postgres.url, name))
        assert terminated >= 1
        load.until(lambda: len(tally.refusals) >= 1, "a refusal of the terminated writes")
        before = tally.acknowledged
        load.until(lambda: tally.acknowledged >= before + 6, "acknowledgements after the fault")
    finally:
        load.finish()
    assert not tally.unexpected, tally.unexpected
    assert tally.codes() == {"database_unavailable"}
    assert database_errors(app.url, "unavailable") >= 1
    recovered(app.url, tally)
    check_nothing_acknowledged_lost(tally, read_stored(database), exact=False)


def test_postgres_stopped_and_restarted_under_load(pg_app: tuple[AppServer, str],
                                                   own_postgres: pgserver.PostgresServer) -> None:
    app, database = pg_app
    tally = Tally()
    load = Load(app.url, tally)
    try:
        load.until(lambda: tally.acknowledged >= 6, "acknowledgements before the fault")
        own_postgres.halt("fast")  # terminates every session, then refuses connections
        try:
            load.until(lambda: len(tally.refusals) >= 3, "refusals while the database is down")
            down = ready(app.url)
            # The probe's status, and nothing of the driver's error (the address, the errno) to an unauthenticated
            # caller.
            assert (down.status_code, down.json(), down.headers.get("retry-after")) == (
                503, {"status": "database_unavailable"}, "5")
            operators = Tally()
            with httpx.Client(base_url=app.url, headers=ADMIN, timeout=60) as client:
                for method, path, body in OPERATOR_CALLS:
                    operators.refused(client.request(method, path, json=body), f"{method} {path}")
            assert not operators.unexpected, operators.unexpected
        finally:
            own_postgres.resume()
        before = tally.acknowledged
        load.until(lambda: tally.acknowledged >= before + 6, "acknowledgements after the restart")
    finally:
        load.finish()
    assert not tally.unexpected, tally.unexpected
    assert tally.codes() == {"database_unavailable"}
    recovered(app.url, tally)
    check_nothing_acknowledged_lost(tally, read_stored(database), exact=False)


def _postgres_processes(server: pgserver.PostgresServer) -> list[psutil.Process]:
    postmaster = psutil.Process(int((server.data_dir / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def test_postgres_hung(pg_app: tuple[AppServer, str], own_postgres: pgserver.PostgresServer) -> None:
    """A database that answers nothing (every PostgreSQL process frozen): /ready says so within its probe's time
    instead of hanging with it, and all is well once the database answers again."""
    app, _ = pg_app
    wait_ready(app.url)
    frozen = _postgres_processes(own_postgres)
    for process in frozen:
        process.suspend()
    try:
        time.sleep(1.5)  # past the probe's cache
        down = ready(app.url)
        assert (down.status_code, down.json()) == (503, {"status": "database_unavailable"})
    finally:
        for process in frozen:
            process.resume()
    recovered(app.url, Tally())


# --- SQLite on a full disk ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB filesystem (tmpfs), to fill up. Mounting needs root (CAP_SYS_ADMIN), as the tests run here and
    in CI; elsewhere the test fails and says so."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs to fill it up, which needs root: {done.stderr.strip()}",
                    pytrace=False)
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` (big writes, then small ones); deleting the file frees them again."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 512):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_sqlite_on_a_full_disk(make_server: Callable[..., AppServer], small_disk: Path) -> None:
    database = f"sqlite:///{small_disk}/alignd.db"
    app = make_server(database=database, admin_keys=["admin-key"])
    try:
        tally = Tally()
        # Long enough rows that every write must grow the database's files.
        big = {**CHAT, "metadata": {f"k{i}": "x" * 500 for i in range(16)}}
        with httpx.Client(base_url=app.url, timeout=120) as client:
            for _ in range(3):
                completion_id = _chat(client, tally, False, big)
                assert completion_id is not None
                _feedback(client, tally, completion_id)
            assert (tally.acknowledged, tally.refusals) == (6, [])

            filler = fill(small_disk)
            # Writes fail as soon as the files need another page; chat (its completion cannot be stored) and
            # feedback alike.
            judged = next(iter(tally.completions))
            for _ in range(40):
                judged = _chat(client, tally, False, big) or judged
                _chat(client, tally, True, big)
                _feedback(client, tally, judged)
                if tally.refused_what() == {"chat", "stream event", "feedback"}:
                    break
            assert not tally.unexpected, tally.unexpected
            # A plain chat and feedback are 503s; a stream, already sent, ends with an error event.
            assert tally.refused_what() == {"chat", "stream event", "feedback"}
            assert tally.codes() == {"database_full"}
            down = ready(app.url)
            assert (down.status_code, down.json()) == (503, {"status": "database_full"})
            assert database_errors(app.url, "full") >= 3
            # What needs no write still works.
            assert client.get("/v1/models").status_code == 200
            listed = client.get("/v1/feedback", params={"limit": 100}, headers=ADMIN)
            assert listed.status_code == 200 and {e["id"] for e in listed.json()["data"]} == tally.feedback

            # SQLite acknowledges nothing it did not commit, and commits nothing it refused.
            check_nothing_acknowledged_lost(tally, read_stored(database), exact=True)

            filler.unlink()
        recovered(app.url, tally)
        check_nothing_acknowledged_lost(tally, read_stored(database), exact=True)
        with sqlite3.connect(small_disk / "alignd.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        app.stop()


# --- what counts as an outage ------------------------------------------------------------------------------------


def test_outage_tells_a_failing_database_from_a_bug(tmp_path: Path) -> None:
    """Real errors of a real SQLite file, as SQLAlchemy wraps them: a bad statement is not an outage (a 500, logged
    as a bug), though sqlite3 calls it an OperationalError too; a database locked past the busy timeout is, and so
    is a store error caused by one; a record the database refuses is not."""
    from sqlalchemy.exc import OperationalError

    from alignd.store import RecordRejectedError, StoreError

    path = tmp_path / "x.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x UNIQUE)")
    holder.execute("INSERT INTO t VALUES (1)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0.05)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("INSERT INTO t VALUES (2)")
    holder.execute("ROLLBACK")
    with pytest.raises(sqlite3.OperationalError) as bug:
        other.execute("SELECT nope FROM t")
    with pytest.raises(sqlite3.IntegrityError) as duplicate:
        other.execute("INSERT INTO t VALUES (1)")
    assert outage(OperationalError("INSERT", {}, locked.value)) == "timeout"
    assert outage(OperationalError("SELECT", {}, bug.value)) is None
    wrapped = StoreError("completion 'c' was not stored")
    wrapped.__cause__ = OperationalError("INSERT", {}, locked.value)
    assert outage(wrapped) == "timeout"
    rejected = RecordRejectedError("completion 'c' was not stored")
    rejected.__cause__ = OperationalError("INSERT", {}, duplicate.value)
    assert outage(rejected) is None
