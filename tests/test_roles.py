"""Cluster roles (issue 12) with real processes: ``alignd serve --trainer off`` replicas and ``alignd trainer`` on one
PostgreSQL database, and the misconfigurations that stop a process, through the real CLI, leaving the database as it
was.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from alignd.cluster import base_identity
from alignd.config import OPTIONS
from alignd.metrics import Metrics
from alignd.policies.registry import ADAPTER_WEIGHTS, PolicyRegistry
from alignd.policies.router import PolicyRouter
from alignd.store import Store
from alignd.store.tables import adapter_blobs, metadata
from tests.engine_fixtures import TEST_ENGINE, create_pg_database
from tests.test_serve_process import _free_port, _wait_ready
from tests.test_shared_state import staged_adapter
from tests.test_training import ADMIN, TRAINER, USER, give_feedback

CLI = [sys.executable, "-m", "alignd.cli"]
ENV_NAMES = {o.path[-1]: o.env for o in OPTIONS}


def _env(**settings: Any) -> dict[str, str]:
    """The process environment with these settings as ALIGND_* variables (the light test engine, no chat limit)."""
    values = {**TEST_ENGINE, "chat_requests_per_minute": 0, **settings}
    return {**os.environ, **{ENV_NAMES[k]: str(v) for k, v in values.items()}}


def _start(command: str, tmp: Path, name: str, port: int, *args: str, log_name: str | None = None,
           **settings: Any) -> subprocess.Popen[bytes]:
    """``alignd COMMAND`` on the data dir ``tmp/name``, its output in ``tmp/(log_name or name).log``."""
    log = (tmp / f"{log_name or name}.log").open("wb")
    return subprocess.Popen([*CLI, command, "--data-dir", str(tmp / name), "--port", str(port), *args],
                            env=_env(**settings), stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def _admin(url: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, **kw)


def test_a_replica_queues_a_run_the_trainer_process_trains_and_the_replica_serves_it(
        demo_model_dir: Path, postgres_server_url: str, tmp_path: Path) -> None:
    database = create_pg_database(postgres_server_url, f"roles_{uuid.uuid4().hex[:8]}")
    common = {"model": str(demo_model_dir), "database": database, "policy_sync_s": 1, **TRAINER,
              "api_keys": USER, "admin_keys": ADMIN}
    replica_port, trainer_port, standby_port = _free_port(), _free_port(), _free_port()
    replica = _start("serve", tmp_path, "replica", replica_port, "--trainer", "off", **common)
    trainer = _start("trainer", tmp_path, "trainer", trainer_port, **common)
    processes = [replica, trainer]
    try:
        replica_url, trainer_url = f"http://127.0.0.1:{replica_port}", f"http://127.0.0.1:{trainer_port}"
        _wait_ready(replica_url, replica)
        _wait_ready(trainer_url, trainer)
        assert "this trainer is active" in (tmp_path / "trainer.log").read_text()
        # The trainer process answers probes and metrics, and no chat.
        assert httpx.get(f"{trainer_url}/health").status_code == 200
        metrics = _admin(trainer_url, "GET", "/metrics")
        assert metrics.status_code == 200 and "alignd_training_running 0.0" in metrics.text
        assert httpx.post(f"{trainer_url}/v1/chat/completions", json={}).status_code == 404

        # A second trainer process waits as standby while the first holds the lease.
        standby = _start("trainer", tmp_path, "standby", standby_port, **common)
        processes.append(standby)
        _wait_for(lambda: "standby:" in (tmp_path / "standby.log").read_text(), 120, "the second trainer's standby")
        assert "this trainer is active" not in (tmp_path / "standby.log").read_text()
        assert _stop(standby) in (0, 1)

        give_feedback(SimpleNamespace(url=replica_url), n_prompts=8)
        queued = _admin(replica_url, "POST", "/v1/training/runs", json={"iterations": 2, "promote": True})
        assert queued.status_code == 202, queued.text
        run = queued.json()
        assert run["status"] == "queued" and run["config"]["request"]["iterations"] == 2
        # A second request queues behind it and is cancelled from the replica before it starts.
        second = _admin(replica_url, "POST", "/v1/training/runs").json()
        cancelled = _admin(replica_url, "POST", f"/v1/training/runs/{second['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text

        def finished() -> dict[str, Any] | None:
            now = _admin(replica_url, "GET", f"/v1/training/runs/{run['id']}").json()
            return now if now["status"] not in ("queued", "running") else None

        done = _wait_for(finished, 900, "the queued run")
        assert done["status"] == "succeeded", done["error"]
        assert done["candidate"] == 1 and done["promoted"] and done["config"]["ppo"]["iterations"] == 2
        assert done["config"]["owner"].startswith(os.uname().nodename)  # the trainer process ran it
        assert _admin(replica_url, "GET", f"/v1/training/runs/{second['id']}").json()["status"] == "cancelled"

        # The replica follows the promotion and serves the new version.
        def served() -> str | None:
            r = httpx.post(f"{replica_url}/v1/chat/completions", headers={"Authorization": f"Bearer {USER}"},
                           json={"model": "alignd", "messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 4}, timeout=60)
            return r.json()["system_fingerprint"] if r.json().get("system_fingerprint") == "policy-1" else None

        assert _wait_for(served, 60, "the replica serving version 1") == "policy-1"
        assert _admin(replica_url, "GET", "/v1/policies").json()["promoted"] == 1
    finally:
        for proc in processes:
            _stop(proc)


# --- misconfiguration -------------------------------------------------------------------------------------------


def _snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, sorted: what "the database is unchanged" compares."""
    async def read() -> dict[str, list[tuple[Any, ...]]]:
        async with await Store.open(url) as store, store.engine.connect() as conn:
            out = {}
            for table in metadata.sorted_tables:
                rows = (await conn.execute(sa.select(table))).all()
                out[table.name] = sorted((tuple(r) for r in rows), key=repr)
            return out

    return asyncio.run(read())


def _refused(*args: str, model: Path, database: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--model", str(model), "--database", database, "--data-dir", str(tmp),
                           "--port", str(_free_port())],
                          env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture
def promoted_database(demo_model_dir: Path, postgres_server_url: str, tmp_path: Path) -> tuple[str, int]:
    """A database used by the demo model, with version 1 (a small adapter) promoted."""
    database = create_pg_database(postgres_server_url, f"roles_{uuid.uuid4().hex[:8]}")

    async def seed() -> int:
        async with await Store.open(database) as store:
            await store.record_base_model(base_identity(str(demo_model_dir)))
            registry = PolicyRegistry(store, PolicyRouter("alignd", lambda: [0]), Metrics(), tmp_path / "seed",
                                      max_rank=8, keep_loaded=1)
            row = await registry.register(staged_adapter(tmp_path, 1), parent=0, run_id="run-seed", metrics={},
                                          passed=True, reason="test")
            await store.set_promoted(row.version, row.created)
            return row.version

    return database, asyncio.run(seed())


def test_split_roles_on_sqlite_are_refused_before_anything_is_written(demo_model_dir: Path, tmp_path: Path) -> None:
    for args, who in ((("serve", "--trainer", "off"), "a serving replica (--trainer off)"),
                      (("trainer",), "a trainer process (alignd trainer)")):
        r = subprocess.run([*CLI, *args, "--model", str(demo_model_dir), "--data-dir", str(tmp_path / "data")],
                           env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert f"alignd: {who} needs a database that a trainer and replicas share: PostgreSQL" in r.stderr
        assert "not SQLite" in r.stderr
        assert not (tmp_path / "data").exists()  # no database file, no data dir


def test_another_base_model_on_the_database_stops_the_process(
        promoted_database: tuple[str, int], demo_model_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    database, _ = promoted_database
    before = _snapshot(database)
    for role in (("serve", "--trainer", "off"), ("trainer",)):
        r = _refused(*role, model=tiny_model_dir, database=database, tmp=tmp_path / role[0])
        assert r.returncode == 2, r.stderr[-2000:]
        message = r.stderr.strip().splitlines()[-1]
        assert message.startswith("alignd: this database belongs to another base model"), message
        assert str(demo_model_dir) in message and str(tiny_model_dir) in message
        assert base_identity(str(demo_model_dir))["sha256"] in message
        assert base_identity(str(tiny_model_dir))["sha256"] in message
    assert _snapshot(database) == before


def test_a_promoted_adapter_that_does_not_match_its_sha256_stops_the_start(
        promoted_database: tuple[str, int], demo_model_dir: Path, tmp_path: Path) -> None:
    database, version = promoted_database

    async def corrupt() -> None:
        async with await Store.open(database) as store, store.engine.begin() as conn:
            row = await store.get_policy(version)
            assert row is not None and row.adapter_files is not None
            await conn.execute(sa.update(adapter_blobs)
                               .where(adapter_blobs.c.sha256 == row.adapter_files[ADAPTER_WEIGHTS])
                               .values(data=b"not the adapter"))

    asyncio.run(corrupt())
    before = _snapshot(database)
    r = _refused("serve", "--trainer", "off", model=demo_model_dir, database=database, tmp=tmp_path / "replica")
    assert r.returncode == 2, r.stderr[-2000:]
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith(f"alignd: the promoted policy {version}'s adapter does not match its SHA-256: the "
                              f"database's copy of {ADAPTER_WEIGHTS} does not match"), message
    assert _snapshot(database) == before
    assert not (tmp_path / "replica" / "policies").exists()  # nothing fetched
