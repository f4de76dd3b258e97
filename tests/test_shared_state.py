"""State replicas share through the database alone (issue 12): adapters as blobs (no shared disk), versions allocated
by the database, at most one promoted row, one trainer through a lease with a heartbeat, and one feedback quota.

Store-level tests run on SQLite and PostgreSQL, two stores (two "replicas") on one database with separate data dirs;
the end-to-end ones run apps on the session's real engine and one PostgreSQL database.
"""

# ruff: noqa: F811 - the fixtures are imported from other test modules and used as parameters
from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from safetensors.numpy import save_file

from alignd.errors import Unprocessable
from alignd.metrics import Metrics
from alignd.policies.registry import ADAPTER_WEIGHTS, PolicyRegistry, check_adapter
from alignd.policies.router import PolicyRouter
from alignd.store import RunRow, Store
from alignd.store.tables import adapter_blobs, policies, training_runs
from alignd.trainer.supervisor import TrainerSupervisor, TriggerPolicy
from tests.engine_fixtures import create_pg_database
from tests.serverkit import AppServer
from tests.test_chat_api import random_adapter  # noqa: F401 - the fixture
from tests.test_feedback_api import complete, send
from tests.test_store import store_url  # noqa: F401 - the fixture, on both databases


def staged_adapter(root: Path, seed: int) -> Path:
    """A small adapter folder the registry accepts (config, safetensors weights): content differs by ``seed``."""
    folder = root / f"staged-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    rng = np.random.default_rng(seed)
    save_file({"lora_A": rng.standard_normal((4, 16)).astype(np.float32)}, str(folder / ADAPTER_WEIGHTS))
    return folder


def registry(store: Store, data_dir: Path) -> PolicyRegistry:
    return PolicyRegistry(store, PolicyRouter("alignd", lambda: [0]), Metrics(), data_dir / "policies", max_rank=8,
                          keep_loaded=1)


async def test_versions_are_allocated_by_the_database_and_one_row_is_promoted(store_url: str, tmp_path: Path) -> None:
    async with await Store.open(store_url) as a, await Store.open(store_url) as b:
        one, two = registry(a, tmp_path / "a"), registry(b, tmp_path / "b")  # two replicas, no shared disk

        async def register(reg: PolicyRegistry, seed: int) -> int:
            row = await reg.register(staged_adapter(tmp_path / "staging", seed), parent=0, run_id=f"run-{seed}",
                                     metrics={}, passed=True, reason="test")
            return row.version

        versions = await asyncio.gather(*(register(one if i % 2 else two, i) for i in range(10)))
        assert sorted(versions) == list(range(1, 11))
        # Each version's files are in the database: the other replica fetches and verifies its copy.
        for version in versions:
            row = await a.get_policy(version)
            assert row is not None and row.adapter_files is not None
            other = two if (tmp_path / "a" / "policies" / str(version)).is_dir() else one
            folder = await other.materialize(row)
            assert folder is not None and folder.is_relative_to(other.data_dir)
            check_adapter(folder, 8, row.metrics["sha256"], row.adapter_files)

        # Concurrent promotions from both replicas: exactly one promoted row, whatever the interleaving.
        await asyncio.gather(*(store.set_promoted(v, row.created) for v, store in zip(versions, [a, b] * 5,
                                                                                       strict=True)))
        promoted = [p.version for p in await a.list_policies() if p.status == "promoted"]
        assert len(promoted) == 1
        # The partial unique index refuses a second promoted row, whoever writes it.
        other = next(v for v in versions if v != promoted[0])
        with pytest.raises(sa.exc.IntegrityError):
            async with a.engine.begin() as conn:
                await conn.execute(sa.update(policies).where(policies.c.version == other).values(status="promoted"))
        assert [p.version for p in await b.list_policies() if p.status == "promoted"] == promoted


async def test_a_corrupt_blob_is_refused_naming_version_and_file(store_url: str, tmp_path: Path) -> None:
    async with await Store.open(store_url) as a, await Store.open(store_url) as b:
        row = await registry(a, tmp_path / "a").register(staged_adapter(tmp_path, 1), parent=0, run_id="run-1",
                                                         metrics={}, passed=True, reason="test")
        assert row.adapter_files is not None
        async with a.engine.begin() as conn:
            await conn.execute(sa.update(adapter_blobs).where(adapter_blobs.c.sha256 == row.metrics["sha256"])
                               .values(data=b"not the adapter"))
        replica = registry(b, tmp_path / "b")
        with pytest.raises(Exception, match=rf"policy {row.version}: the database's copy of {ADAPTER_WEIGHTS} does "
                                            "not match its SHA-256"):
            await replica.materialize(row)
        assert not (tmp_path / "b" / "policies").exists() or not any((tmp_path / "b" / "policies").iterdir())
        assert (await b.get_policy(row.version)) == row  # the database is unchanged
        # A local copy altered after it was fetched is refused too, naming the file.
        (tmp_path / "a" / "policies" / str(row.version) / "adapter_config.json").write_text('{"r": 4}')
        with pytest.raises(Exception, match=r"adapter_config.json does not match the SHA-256"):
            check_adapter(tmp_path / "a" / "policies" / str(row.version), 8, None, row.adapter_files)


async def test_one_trainer_holds_the_lease_and_the_next_fails_a_dead_ones_run(store_url: str, tmp_path: Path) -> None:
    async with await Store.open(store_url) as a, await Store.open(store_url) as b:
        def supervisor(store: Store) -> TrainerSupervisor:  # both on one data dir: still two instances
            return TrainerSupervisor(store, registry(store, tmp_path), Metrics(), base_model=lambda: "",
                                     database_url=store_url, runs_dir=tmp_path / "runs", config=lambda _: None,  # type: ignore[arg-type, return-value]
                                     threads=1, trigger=TriggerPolicy(False, 1, 1, 0), run_timeout_s=None,
                                     lease_s=1.0)

        first, second = supervisor(a), supervisor(b)
        assert first.owner != second.owner
        # The first takes the lease and runs (its run records it as holder), heartbeating.
        assert await a.acquire_lease(first.owner, first.lease_s) is None
        now = datetime.now(UTC)
        await a.insert_run(RunRow(id="run-first", status="running", phase="ppo", progress=0.5, trigger="manual",
                                  parent=0, candidate=None, promoted=False, config={}, metrics={}, error=None,
                                  created=now, finished=None, holder=first.owner, heartbeat=now))
        assert await a.heartbeat(first.owner, first.lease_s, "run-first")
        assert await b.acquire_lease(second.owner, second.lease_s) == first.owner
        assert await second.sweep() == []  # alive: its run is left alone
        assert (await b.get_run("run-first")).status == "running"  # type: ignore[union-attr]

        # The first stops heartbeating (its process died): once its lease expires the second takes over.
        for _ in range(100):
            if failed := await second.sweep():
                break
            await asyncio.sleep(0.1)
        assert failed == ["run-first"]
        run = await a.get_run("run-first")
        assert run is not None and run.status == "failed"
        assert f"its trainer {first.owner} stopped heartbeating" in (run.error or "")  # the dead holder, named
        assert f"marked failed by {second.owner}" in (run.error or "")
        assert await b.lease_holder() is None  # the sweep gave the lease back
        assert not await a.heartbeat(first.owner, first.lease_s, "run-first")  # a late first learns it lost it
        async with a.engine.connect() as conn:
            assert (await conn.execute(sa.select(training_runs.c.status)
                                       .where(training_runs.c.id == "run-first"))).scalar() == "failed"


def test_replicas_share_adapters_through_the_database(make_server: Callable[..., AppServer],
                                                      postgres_server_url: str, random_adapter: Path,
                                                      tmp_path: Path) -> None:
    database = create_pg_database(postgres_server_url, f"shared_{uuid.uuid4().hex[:8]}")
    first, second = make_server(database=database), make_server(database=database)  # own data dirs each
    staged = tmp_path / "staged"
    shutil.copytree(random_adapter, staged)
    row = first.loop.run(first.state.registry.register(staged, parent=0, run_id="run-x", metrics={}, passed=True,
                                                        reason="test"))
    second_copy = Path(second.state.settings.data_path) / "policies" / str(row.version)
    assert not second_copy.exists()
    first.loop.run(first.state.registry.promote(row.version))
    engine: Any = second.state.engine
    # The second loads it by itself (NOTIFY), from the database: then both serve it (tests/test_replicas.py).
    deadline = time.monotonic() + 15
    while second.state.router.promoted != row.version:
        assert time.monotonic() < deadline, "the second replica did not follow the promotion"
        time.sleep(0.1)
    assert second_copy.is_dir() and row.version in engine.loaded_versions
    assert complete(second, n=1)[0]  # it serves
    assert second.loop.run(second.state.store.promoted_version()) == row.version

    # A version whose blob is corrupt in the database: the second refuses it, naming it, and nothing changes.
    staged = tmp_path / "staged-2"
    shutil.copytree(random_adapter, staged)
    bad = first.loop.run(first.state.registry.register(staged, parent=row.version, run_id="run-y", metrics={},
                                                        passed=True, reason="test"))

    async def corrupt() -> None:
        async with first.state.store.engine.begin() as conn:
            await conn.execute(sa.update(adapter_blobs).where(adapter_blobs.c.sha256 == bad.metrics["sha256"])
                               .values(data=b"corrupt"))

    first.loop.run(corrupt())
    with pytest.raises(Unprocessable, match=rf"Policy {bad.version} could not be loaded.*{ADAPTER_WEIGHTS}"):
        second.loop.run(second.state.registry.promote(bad.version))
    assert second.loop.run(second.state.store.promoted_version()) == row.version
    assert second.state.router.promoted == row.version


def test_the_feedback_quota_holds_across_replicas(make_server: Callable[..., AppServer],
                                                  postgres_server_url: str) -> None:
    database = create_pg_database(postgres_server_url, f"quota_{uuid.uuid4().hex[:8]}")
    replicas = [make_server(database=database, plugins={"feedback_per_minute": 3}) for _ in range(2)]
    cid, _ = complete(replicas[0], n=1)
    statuses = [send(replicas[i % 2], completion_id=cid, kind="thumbs", value="up", user="bob").status_code
                for i in range(6)]
    assert statuses.count(201) == 3 and statuses[:3] == [201, 201, 201]  # one quota, not one per replica
    assert set(statuses[3:]) == {429}
    assert send(replicas[1], completion_id=cid, kind="thumbs", value="up", user="carol").status_code == 201
