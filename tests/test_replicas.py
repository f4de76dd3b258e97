"""Consistent promotion across replicas (issue 12, part 3): heartbeats, the two-phase flip of the served version, the
laggards of a timeout, LISTEN/NOTIFY, rollback, and the flip happening once under a race.

The pure parts are unit tests; the rest runs two apps (two replicas, own data dirs) on the session's real engine and
one real PostgreSQL database. They share one engine, so each registry counts only what it loaded itself.
"""

# ruff: noqa: F811 - the fixtures are imported from other test modules and used as parameters
from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from alignd.policies.replicas import Liveness, flip_laggards, lagging
from alignd.store import PolicyRow, Store
from alignd.store.replicas import PromotionRow, ReplicaRow
from tests.engine_fixtures import create_pg_database
from tests.serverkit import AppServer
from tests.test_chat_api import random_adapter  # noqa: F401 - the fixture
from tests.test_feedback_api import ADMIN, HELLO

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def replica(name: str, loaded: list[int], *, ready: bool = True, seen_s: float = 0.0, error: str | None = None,
            role: str = "all") -> ReplicaRow:
    return ReplicaRow(instance_id=name, host="h", pid=1, role=role, started_at=NOW - timedelta(hours=1),
                      last_seen=NOW - timedelta(seconds=seen_s), ready=ready, loaded=loaded, serving=0, error=error)


def state(desired: int, served: int, desired_s_ago: float = 0.0) -> PromotionRow:
    return PromotionRow(desired=desired, served=served, desired_at=NOW - timedelta(seconds=desired_s_ago),
                        served_at=None, reason=None, flipped_by=None, laggards={})


def test_a_replica_is_live_within_its_missed_heartbeats() -> None:
    liveness = Liveness(heartbeat_s=5, missed=3)
    assert liveness.live(replica("a", [0], seen_s=15), NOW)
    assert not liveness.live(replica("a", [0], seen_s=15.5), NOW)


def test_the_flip_waits_for_every_live_ready_replica_or_the_timeout() -> None:
    both = [replica("a", [0, 3]), replica("b", [0])]
    assert flip_laggards(state(3, 3), both, NOW, 120) is None  # nothing pending
    assert flip_laggards(state(3, 0, 119), both, NOW, 120) is None  # b is still loading it
    assert flip_laggards(state(3, 0), [replica("a", [0, 3]), replica("b", [0, 3])], NOW, 120) == {}
    # Replicas that serve nobody are not waited for: starting (not ready), or the trainer process.
    assert flip_laggards(state(3, 0), [both[0], replica("b", [0], ready=False),
                                       replica("t", [0], role="trainer")], NOW, 120) == {}
    late = flip_laggards(state(3, 0, 120), [both[0], replica("b", [0], error="corrupt")], NOW, 120)
    assert late == {"b": "could not load version 3: corrupt"}
    assert flip_laggards(state(3, 0, 121), both, NOW, 120) == {"b": "had not loaded version 3 within 120 s"}
    assert [r.instance_id for r in lagging(3, both)] == ["b"]
    assert flip_laggards(state(0, 3), both, NOW, 120) == {}  # a rollback to the base: loaded everywhere


def test_the_flip_happens_once_under_a_race(postgres_server_url: str) -> None:
    database = create_pg_database(postgres_server_url, f"flip_{uuid.uuid4().hex[:8]}")

    async def race() -> None:
        async with await Store.open(database) as a, await Store.open(database) as b:
            for version in range(1, 4):
                await a.insert_policy(PolicyRow(version=version, status="candidate", parent=0, run_id=None,
                                                adapter_path=None, metrics={}, reason=None, created=NOW,
                                                promoted_at=None))
            for version in (1, 2, 3, 1):
                await a.set_desired(version, datetime.now(UTC), f"to {version}")
                done = await asyncio.gather(*(s.flip(version, name, {}, datetime.now(UTC))
                                              for _ in range(4) for s, name in ((a, "a"), (b, "b"))))
                assert done.count(True) == 1, done
                row = await b.promotion_state()
                assert row.served == row.desired == version and row.flipped_by in ("a", "b")
                assert [p.version for p in await b.list_policies() if p.status == "promoted"] == [version]
            assert not await a.flip(2, "a", {}, datetime.now(UTC))  # not the desired version: nothing

    asyncio.run(race())


def chat_version(srv: AppServer) -> str:
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                   json={"model": "alignd", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()["system_fingerprint"]


def policies(srv: AppServer) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/v1/policies", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` held (polled every 0.1 s); fails after ``timeout``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def replicas_on(make_server: Callable[..., AppServer], postgres_server_url: str, **store: Any
                ) -> tuple[AppServer, AppServer]:
    database = create_pg_database(postgres_server_url, f"replicas_{uuid.uuid4().hex[:8]}")
    first, second = (make_server(database=database, admin_keys=["admin-key"], store=store) for _ in range(2))
    wait_for(lambda: len(policies(first)["replicas"]) == 2, 10, "both replicas heartbeat")
    return first, second


def register(srv: AppServer, adapter: Path, tmp_path: Path) -> int:
    staged = tmp_path / f"staged-{uuid.uuid4().hex[:6]}"
    shutil.copytree(adapter, staged)
    return srv.loop.run(srv.state.registry.register(staged, parent=0, run_id="run-r", metrics={}, passed=True,
                                                     reason="test")).version


def test_a_promotion_is_served_once_every_replica_loaded_it(make_server: Callable[..., AppServer],
                                                             postgres_server_url: str, random_adapter: Path,
                                                             tmp_path: Path) -> None:
    # A poll a minute: whatever happens within seconds is LISTEN/NOTIFY's doing.
    first, second = replicas_on(make_server, postgres_server_url, policy_sync_s=60, heartbeat_s=1)
    a_id, b_id = first.state.registry.replicas.instance_id, second.state.registry.replicas.instance_id
    assert second.state.registry.replicas.listening
    version = register(first, random_adapter, tmp_path)

    # The second replica is busy (its registry's lock held): it cannot load the new version yet.
    lock = second.state.registry._lock
    first.loop.run(lock.acquire())
    try:
        first.loop.run(first.state.registry.promote(version, reason="operator"))
        assert first.state.registry._holds(version)  # loaded here...
        assert first.state.router.promoted == 0 and chat_version(first) == "policy-0"  # ...but not served yet
        listing = policies(first)
        promotion = listing["promotion"]
        assert promotion["pending"] and promotion["desired"] == version and promotion["served"] == 0
        assert promotion["loaded_on"] == [a_id] and promotion["waiting_for"] == [b_id]
        assert {r["instance_id"]: r["serving"] for r in listing["replicas"]} == {a_id: 0, b_id: 0}
        assert next(p for p in listing["data"] if p["version"] == version)["loaded_on"] == [a_id]
        time.sleep(1.5)  # heartbeats go on meanwhile: nothing flips while the second is live and lacks it
        assert first.state.router.promoted == 0 and policies(first)["promotion"]["pending"]
    finally:
        first.loop.run(_release(lock))
    took = wait_for(lambda: first.state.router.promoted == version == second.state.router.promoted, 15,
                    "both serve the new version")
    assert took < 10  # the poll would have taken up to 60 s
    assert chat_version(first) == chat_version(second) == f"policy-{version}"
    promotion = policies(second)["promotion"]
    assert not promotion["pending"] and promotion["served"] == version and promotion["laggards"] == {}
    assert promotion["flipped_by"] in (a_id, b_id)  # whichever saw everyone had it first
    assert first.loop.run(first.state.store.promoted_version()) == version

    # Rollback flips back the same way (the base is loaded everywhere: at once).
    first.loop.run(first.state.registry.rollback(0))
    assert first.state.router.promoted == 0
    wait_for(lambda: second.state.router.promoted == 0, 10, "the second follows the rollback")
    assert chat_version(second) == "policy-0"


async def _release(lock: asyncio.Lock) -> None:
    lock.release()


def test_a_replica_that_cannot_load_is_left_behind_after_the_timeout(make_server: Callable[..., AppServer],
                                                                      postgres_server_url: str,
                                                                      random_adapter: Path, tmp_path: Path) -> None:
    first, second = replicas_on(make_server, postgres_server_url, policy_sync_s=1, heartbeat_s=1,
                                promotion_timeout_s=3)
    b_id = second.state.registry.replicas.instance_id
    version = register(first, random_adapter, tmp_path)
    # The second's local copy is corrupt: its SHA-256 check refuses the version.
    copy = Path(second.state.settings.data_path) / "policies" / str(version)
    shutil.copytree(random_adapter, copy)
    (copy / "adapter_model.safetensors").write_bytes(b"corrupt")

    started = time.monotonic()
    first.loop.run(first.state.registry.promote(version))
    assert first.state.router.promoted == 0
    wait_for(lambda: first.state.router.promoted == version, 15, "the flip after the timeout")
    assert time.monotonic() - started >= 2.5  # not before the timeout
    assert chat_version(first) == f"policy-{version}"
    promotion = policies(first)["promotion"]
    assert list(promotion["laggards"]) == [b_id]
    assert "could not load version" in promotion["laggards"][b_id]
    wait_for(lambda: httpx.get(f"{second.url}/ready").status_code == 503, 10, "the laggard is not ready")
    ready = httpx.get(f"{second.url}/ready").json()
    assert ready["status"] == "policy_unavailable" and f"version {version} is served" in ready["detail"]
    assert "SHA-256" in ready["detail"]
    wait_for(lambda: not next(r for r in policies(first)["replicas"] if r["instance_id"] == b_id)["ready"], 10,
             "GET /v1/policies shows the laggard not ready")
    assert second.state.router.promoted == 0  # it never served a version it could not load

    # Repaired, it catches up from the database at its next poll and is ready again.
    shutil.rmtree(copy)
    wait_for(lambda: httpx.get(f"{second.url}/ready").status_code == 200, 15, "the laggard catches up")
    assert chat_version(second) == f"policy-{version}"
    wait_for(lambda: next(r for r in policies(first)["replicas"] if r["instance_id"] == b_id)["ready"], 10,
             "its heartbeat says ready again")


def test_a_replica_that_stopped_heartbeating_is_not_waited_for(make_server: Callable[..., AppServer],
                                                               postgres_server_url: str, random_adapter: Path,
                                                               tmp_path: Path) -> None:
    first, second = replicas_on(make_server, postgres_server_url, policy_sync_s=60, heartbeat_s=0.5,
                                promotion_timeout_s=60)
    version = register(first, random_adapter, tmp_path)
    second.stop()  # its row stays, unrefreshed: live for 3 heartbeats, then ignored
    time.sleep(1.6)
    first.loop.run(first.state.registry.promote(version))
    assert first.state.router.promoted == version  # at once: the only live replica has it
    assert [r["instance_id"] for r in policies(first)["replicas"]] == [first.state.registry.replicas.instance_id]
