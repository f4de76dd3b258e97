"""The cluster proof (issue 12), with real processes on this machine: two serving replicas (``alignd serve --trainer
off``, each on its own data dir: no shared disk) and two ``alignd trainer`` processes on one fresh PostgreSQL
database, while clients chat and give feedback round-robin over both replicas the whole time.

One test, sharing the processes across its phases (each starts a vLLM engine: a minute or more on two cores):

1. a run queued on a replica is trained by the active trainer and promoted; the second trainer stays standby;
2. the flip to the new version, then a rollback, reach both replicas consistently: no completion names a version
   before the database flipped to it (which happens once every live replica has it loaded), and every completion
   started once both replicas serve it names it;
3. the active trainer is SIGKILLed in the middle of a run, together with one replica: the standby takes the lease,
   marks the orphaned run failed naming the dead holder, and trains the next queued run, which is promoted while the
   replica is down; the replica, restarted on its own data dir, catches up from the database (fetches the new
   adapter, serves it, /ready 200), and the surviving replica answered every request;
4. what was acknowledged is what is stored: every completion (with the version it named) and every feedback event
   answered 201 is in PostgreSQL, and the only rows nobody acknowledged are requests the killed replica was
   answering when it died.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import select

from alignd.store import Store
from alignd.store.tables import completions, feedback
from tests.engine_fixtures import create_pg_database
from tests.test_process_faults import _gone
from tests.test_roles import _admin, _start, _stop, _wait_for
from tests.test_serve_process import _cmdline, _free_port, _wait_ready
from tests.test_training import ADMIN, TRAINER, USER

KINDS = ("pairwise", "thumbs", "rating")
"""Feedback kinds the clients send, in turn (pairwise on a two-choice completion)."""
ACTIVE = re.compile(r"took the trainer lease \((\S+)\): this trainer is active")
STANDBY = re.compile(r"standby: (\S+) holds the trainer lease")
LEASE_S, RETRY_S = 30.0, 10.0  # the trainer lease and a standby's retry period (server/trainer/supervisor.py)


@dataclass
class Call:
    """One request a client made: to which replica, when, and what came back."""

    replica: str
    what: str
    """``chat``, or the feedback kind."""
    start: float
    end: float
    """time.monotonic() around the request."""
    wall_end: float
    """time.time() at its end: compared with the database's flip times (the same clock: one machine)."""
    status: int | None
    """None: no answer (connection refused or dropped)."""
    id: str | None = None
    """The completion's or the feedback event's id, when acknowledged."""
    version: int | None = None
    """The policy version a completion names (its ``system_fingerprint``)."""


class Traffic:
    """Clients chatting, and giving feedback on each reply through the other replica (the completion is in the shared
    database), round-robin over the replicas, in background threads, recording every request. Bounded in time."""

    def __init__(self, urls: dict[str, str], clients: int = 2, pause_s: float = 0.25, limit_s: float = 900) -> None:
        self.urls = urls
        self.calls: list[Call] = []
        self.began = time.monotonic()
        self._names = sorted(urls)
        self._turns = itertools.count()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._pause_s, self._limit_s = pause_s, limit_s
        self._threads = [threading.Thread(target=self._client, name=f"cluster-client-{i}", daemon=True)
                         for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(120)

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def acked(self, what: str) -> int:
        return sum(1 for c in self.snapshot() if c.what == what and c.status in (200, 201))

    def chats_since(self, replica: str, since: float) -> int:
        """Chats on ``replica`` started at or after ``since`` and answered."""
        return sum(1 for c in self.snapshot() if c.replica == replica and c.what == "chat" and c.start >= since
                   and c.status == 200)

    def _client(self) -> None:
        deadline = time.monotonic() + self._limit_s
        with httpx.Client(headers={"Authorization": f"Bearer {USER}"}, timeout=60) as http:
            while not self._stopped.is_set() and time.monotonic() < deadline:
                turn = next(self._turns)
                here = self._names[turn % len(self._names)]
                kind = KINDS[(turn // len(self._names)) % len(KINDS)]
                chat = self._request(http, here, "chat", "/v1/chat/completions", {
                    "model": "alignd", "messages": [{"role": "user", "content": f"Hello there, number {turn}"}],
                    "max_tokens": 8, "temperature": 1.0, "n": 2 if kind == "pairwise" else 1})
                if chat.status == 200:
                    body = {"completion_id": chat.id, "kind": kind, **{
                        "pairwise": {"winner": turn % 2}, "thumbs": {"value": "up" if turn % 2 else "down"},
                        "rating": {"score": 1 + turn % 10}}[kind]}
                    self._request(http, self._names[(turn + 1) % len(self._names)], kind, "/v1/feedback", body)
                self._stopped.wait(self._pause_s)

    def _request(self, http: httpx.Client, replica: str, what: str, path: str, body: dict[str, Any]) -> Call:
        start = time.monotonic()
        try:
            r = http.post(f"{self.urls[replica]}{path}", json=body)
        except httpx.TransportError:  # the replica is down (or died while answering)
            call = Call(replica, what, start, time.monotonic(), time.time(), None)
        else:
            call = Call(replica, what, start, time.monotonic(), time.time(), r.status_code)
            if r.status_code in (200, 201):
                call.id = r.json()["id"]
                if what == "chat":
                    call.version = int(r.json()["system_fingerprint"].removeprefix("policy-"))
        with self._lock:
            self.calls.append(call)
        return call


def _serving(url: str) -> int:
    """The version this replica's served name routes to now."""
    return int(_admin(url, "GET", "/v1/policies").json()["promoted"])


def _everywhere(urls: list[str], version: int, timeout: float = 120) -> float:
    """Wait until every replica says it serves ``version``; the time.monotonic() at which that was seen."""
    _wait_for(lambda: all(_serving(u) == version for u in urls), timeout, f"every replica serving {version}")
    return time.monotonic()


def _flip(url: str, version: int, replicas: list[str]) -> float:
    """The database's promotion row after the flip to ``version``: it flipped with no laggard (every live replica
    had loaded it), every replica in ``replicas`` among those that had; returns the flip's time (epoch seconds)."""
    policies = _admin(url, "GET", "/v1/policies").json()
    promotion = policies["promotion"]
    assert promotion["served"] == version and not promotion["pending"], promotion
    assert promotion["laggards"] == {}, promotion
    loaded_on = set(promotion["loaded_on"])
    assert set(replicas) <= loaded_on, (replicas, promotion)
    return datetime.fromisoformat(promotion["served_at"]).timestamp()


def _instance(url: str) -> str:
    """This replica's instance id (its heartbeat row)."""
    return next(r["instance_id"] for r in _admin(url, "GET", "/v1/policies").json()["replicas"] if r["this"])


def _run(url: str, run_id: str) -> dict[str, Any]:
    return dict(_admin(url, "GET", f"/v1/training/runs/{run_id}").json())


def _settled(url: str, run_id: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        run = _run(url, run_id)
        return run if run["status"] not in ("queued", "running") else None

    return dict(_wait_for(done, timeout, f"run {run_id} settled"))


def _logged(path: Path, pattern: re.Pattern[str]) -> str | None:
    found = pattern.search(path.read_text(errors="replace"))
    return found.group(1) if found else None


def check_flip(calls: list[Call], *, old: int, new: int, flipped: float, everywhere: float, since: float,
               until: float) -> int:
    """The promotion invariant over the chats started in [``since``, ``until``) (``old`` served everywhere from
    ``since``; nothing but the flip to ``new`` happened before ``until``): each names ``old`` or ``new``; none names
    ``new`` and finished before the database flipped to it (``flipped``, epoch seconds: every live replica had it
    loaded then); every one started once both replicas served ``new`` (``everywhere``) names it. Returns how many
    started after ``everywhere``."""
    window = [c for c in calls if c.what == "chat" and c.status == 200 and since <= c.start < until]
    assert window, f"no chat answered between the flips to {old} and {new}"
    for c in window:
        assert c.version in (old, new), (c, old, new)
        if c.version == new:
            assert c.wall_end >= flipped, f"{c} names {new} before the flip at {flipped}"
        if c.start >= everywhere:
            assert c.version == new, f"{c} started after every replica served {new}, and names {c.version}"
    return sum(1 for c in window if c.start >= everywhere)


def _stored(database: str) -> tuple[dict[str, int], dict[str, str]]:
    """Completions (id -> policy version) and feedback events (id -> kind) as PostgreSQL holds them."""
    async def read() -> tuple[dict[str, int], dict[str, str]]:
        async with await Store.open(database) as store, store.engine.connect() as conn:
            chats = {r.id: r.policy_version for r in await conn.execute(
                select(completions.c.id, completions.c.policy_version))}
            events = {r.id: r.kind for r in await conn.execute(select(feedback.c.id, feedback.c.kind))}
            return chats, events

    return asyncio.run(read())


def test_two_replicas_and_two_trainers_on_one_database_stay_consistent_through_promotions_and_kills(
        demo_model_dir: Path, postgres_server_url: str, tmp_path: Path) -> None:
    database = create_pg_database(postgres_server_url, f"cluster_{uuid.uuid4().hex[:8]}")
    common = {"model": str(demo_model_dir), "database": database, "policy_sync_s": 2, **TRAINER,
              "api_keys": USER, "admin_keys": ADMIN}
    ports = {name: _free_port() for name in ("a", "b", "t1", "t2")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    traffic: Traffic | None = None

    def replica(name: str, log_name: str | None = None) -> None:
        procs[name] = _start("serve", tmp_path, f"replica-{name}", ports[name], "--trainer", "off",
                             log_name=log_name, **common)

    try:
        replica("a")
        replica("b")
        procs["t1"] = _start("trainer", tmp_path, "trainer-1", ports["t1"], **common)
        t1 = _wait_for(lambda: _logged(tmp_path / "trainer-1.log", ACTIVE), 240, "the first trainer's lease")
        procs["t2"] = _start("trainer", tmp_path, "trainer-2", ports["t2"], **common)
        for name in ("a", "b", "t1", "t2"):
            _wait_ready(url[name], procs[name], timeout=600)
        # The second trainer waits as standby while the first holds the lease.
        assert _wait_for(lambda: _logged(tmp_path / "trainer-2.log", STANDBY), 60, "the standby") == t1
        assert _logged(tmp_path / "trainer-2.log", ACTIVE) is None
        replicas = [_instance(url["a"]), _instance(url["b"])]

        traffic = Traffic({"a": url["a"], "b": url["b"]})
        _wait_for(lambda: traffic.acked("pairwise") >= 6 and traffic.acked("thumbs") >= 3, 300, "feedback to train on")

        # 1. A run queued on replica b, trained by the active trainer, promoted: version 1 reaches both replicas.
        queued = _admin(url["b"], "POST", "/v1/training/runs", json={"iterations": 2})
        assert queued.status_code == 202, queued.text
        run1 = _settled(url["a"], queued.json()["id"], 600)
        assert run1["status"] == "succeeded", run1["error"]
        assert run1["candidate"] == 1 and run1["promoted"] and run1["config"]["owner"] == t1
        everywhere1 = _everywhere([url["a"], url["b"]], 1)
        flipped1 = _flip(url["a"], 1, replicas)
        _wait_for(lambda: all(traffic.chats_since(r, everywhere1) >= 2 for r in "ab"), 120, "chats on version 1")

        # 2. A rollback from replica a: version 0 again, everywhere.
        rollback_at = time.monotonic()
        rolled = _admin(url["a"], "POST", "/v1/policies/rollback")
        assert rolled.status_code == 200 and rolled.json()["version"] == 0, rolled.text
        everywhere0 = _everywhere([url["a"], url["b"]], 0)
        flipped0 = _flip(url["b"], 0, replicas)
        _wait_for(lambda: all(traffic.chats_since(r, everywhere0) >= 2 for r in "ab"), 120, "chats on version 0")

        # 3. Two runs queued; the active trainer SIGKILLed in the first one's PPO, and replica b with it.
        queued_at = time.monotonic()
        doomed = _admin(url["a"], "POST", "/v1/training/runs", json={"iterations": 1000}).json()
        queued = _admin(url["a"], "POST", "/v1/training/runs", json={"iterations": 2})
        assert queued.status_code == 202, queued.text
        next_run = queued.json()["id"]
        _wait_for(lambda: (run := _run(url["a"], doomed["id"]))["phase"] == "ppo"
                  or run["status"] not in ("queued", "running"), 300, "the first run's PPO")
        in_ppo = _run(url["a"], doomed["id"])
        assert in_ppo["status"] == "running" and in_ppo["config"]["owner"] == t1, in_ppo
        # Their engines (and the run's trainer process) die with them: nothing left holding memory.
        children = {p for name in ("t1", "b") for p in psutil.Process(procs[name].pid).children(recursive=True)}
        assert sum(1 for p in children if "EngineCore" in " ".join(_cmdline(p))) == 2, children
        killed_at, killed_wall = time.monotonic(), time.time()
        procs["t1"].send_signal(signal.SIGKILL)
        procs["b"].send_signal(signal.SIGKILL)
        procs["t1"].wait(10)
        procs["b"].wait(10)
        assert not _gone(children), "the killed trainer or replica left processes behind"

        orphan = _settled(url["a"], doomed["id"], LEASE_S + RETRY_S + 60)
        t2 = _logged(tmp_path / "trainer-2.log", ACTIVE)
        assert t2 is not None and t2 != t1
        assert orphan["status"] == "failed", orphan
        assert f"its trainer {t1} stopped heartbeating" in orphan["error"], orphan["error"]
        assert f"marked failed by {t2}, which took the trainer lease" in orphan["error"], orphan["error"]
        taken = datetime.fromisoformat(orphan["finished"]).timestamp() - killed_wall
        assert taken <= LEASE_S + RETRY_S + 15, f"the standby took {taken:.0f} s to take over"
        run3 = _settled(url["a"], next_run, 600)
        assert run3["status"] == "succeeded", run3["error"]
        assert run3["config"]["owner"] == t2 and run3["candidate"] == 2 and run3["promoted"]
        assert run3["parent"] == 0
        _everywhere([url["a"]], 2)
        flipped2 = _flip(url["a"], 2, replicas[:1])

        # 4. Replica b, restarted on its own data dir, catches up from the database.
        assert not (tmp_path / "replica-b" / "policies" / "2").exists()
        replica("b", log_name="replica-b-restarted")
        _wait_ready(url["b"], procs["b"], timeout=600)
        back_at = time.monotonic()
        ready = httpx.get(f"{url['b']}/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["policy_version"] == 2, ready.text
        assert "policy 2 fetched from the database" in (tmp_path / "replica-b-restarted.log").read_text()
        everywhere2 = _everywhere([url["a"], url["b"]], 2)
        _wait_for(lambda: all(traffic.chats_since(r, everywhere2) >= 2 for r in "ab"), 120, "chats on version 2")
        traffic.stop()
        calls = traffic.snapshot()

        # The promotions' invariant, for each of the three flips.
        after = {1: check_flip(calls, old=0, new=1, flipped=flipped1, everywhere=everywhere1, since=traffic.began,
                               until=rollback_at),
                 0: check_flip(calls, old=1, new=0, flipped=flipped0, everywhere=everywhere0, since=everywhere1,
                               until=queued_at),
                 2: check_flip(calls, old=0, new=2, flipped=flipped2, everywhere=everywhere2, since=everywhere0,
                               until=float("inf"))}
        # Replica b, restarted after the flip to version 2, named it in every chat it answered.
        assert all(c.version == 2 for c in calls if c.replica == "b" and c.what == "chat" and c.start >= killed_at
                   and c.status == 200)

        # No failed request on the surviving replica; on the killed one only during its downtime.
        a_failed = [c for c in calls if c.replica == "a" and c.status not in (200, 201)]
        assert not a_failed, a_failed
        down = [c for c in calls if c.replica == "b" and c.status not in (200, 201)]
        assert all(c.end >= killed_at and c.start <= back_at and c.status in (None, 503) for c in down), down
        in_flight = [c for c in down if c.start < killed_at]  # the kill cut them off: stored or not

        for name in ("a", "b", "t2"):
            assert _stop(procs[name]) in (0, 1)

        # Counts in = counts stored.
        chats, events = _stored(database)
        acked_chats = {c.id: c.version for c in calls if c.what == "chat" and c.status == 200}
        assert {i: chats.get(i) for i in acked_chats} == acked_chats  # each stored, naming the version it answered
        assert len(chats) - len(acked_chats) <= sum(1 for c in in_flight if c.what == "chat")
        for kind in KINDS:
            acked = {c.id for c in calls if c.what == kind and c.status == 201}
            stored = {i for i, k in events.items() if k == kind}
            assert acked <= stored, (kind, acked - stored)
            assert len(stored - acked) <= sum(1 for c in in_flight if c.what == kind), kind
            assert acked, f"no {kind} feedback acknowledged"
        print(f"cluster proof: {len(acked_chats)} completions and "
              f"{sum(1 for c in calls if c.status == 201)} feedback events acknowledged and stored "
              f"({len(chats)} completions, {len(events)} events in the database); {len(down)} requests to the "
              f"killed replica unanswered, {len(in_flight)} of them in flight at the kill; chats after each flip "
              f"reached both replicas: {after}; the standby took over {taken:.0f} s after the kill; replica b was "
              f"down {back_at - killed_at:.0f} s")
    finally:
        if traffic is not None:
            traffic.stop()
        for proc in procs.values():
            _stop(proc)
