# ruff: noqa: F811 - the store fixtures are imported from test_store and used as parameters
"""Training-data selection, run rows and the policy registry's rows, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from alignd.errors import NotFound
from alignd.policies.router import RESERVED_VERSIONS, PolicyRouter
from alignd.store import FeedbackRecord, Label, PolicyRow, PreferencePair, RunRow, Store
from alignd.trainer.config import DataConfig
from alignd.trainer.data import is_heldout, length_cap, load_training_data
from alignd.trainer.reward_model import PairGroup
from tests.test_store import make_record, store, store_url  # noqa: F401 - the fixtures, on both databases

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def _feedback(store: Store, n: int, *, prompt: str | None = None, ranking: bool = False) -> str:
    """A completion and one feedback event on it with one pair (three for a ranking) and one label."""
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt or f"question {n}"}]}]
    await store.record_completion(make_record(n, messages=messages, created=T0 + timedelta(seconds=n)))
    pairs = [PreferencePair(prompt=messages, chosen=f"good {n}", rejected=f"bad {n}", chosen_choice=0,
                        rejected_choice=1)]
    if ranking:
        pairs += [PreferencePair(prompt=messages, chosen=f"good {n}", rejected=f"worse {n}", weight=1 / 3),
                  PreferencePair(prompt=messages, chosen=f"bad {n}", rejected=f"worse {n}", weight=1 / 3)]
    fid = f"fb-{n:06d}"
    await store.record_feedback(FeedbackRecord(
        id=fid, completion_id=f"chatcmpl-{n:06d}", kind="ranking" if ranking else "pairwise", choice=None,
        payload={}, user=None, comment=None, tags=[], idempotency_key=None, request_hash=None, policy_version=0,
        created=T0 + timedelta(seconds=n), pairs=pairs,
        labels=[Label(prompt=messages, reply=f"good {n}", good=True, choice=0)]))
    return fid


def _events(groups: list[PairGroup]) -> set[str]:
    """The feedback event of each pair group (every pair of event ``n`` is about "… n")."""
    return {f"fb-{int(group[0].chosen.split()[-1]):06d}" for group in groups}


def _held(n: int) -> bool:
    return is_heldout(f"chatcmpl-{n:06d}", 0.2)


async def test_selection_accumulates_weighs_by_recency_and_holds_out_by_completion(store: Store) -> None:
    config = DataConfig(heldout_fraction=0.2, recency_half_life=20, max_prompts=100)
    ids = [await _feedback(store, n, ranking=n % 4 == 0) for n in range(40)]
    await _feedback(store, 40, prompt="question 1")  # a repeated prompt
    ids.append("fb-000040")
    held_ids = {f"fb-{n:06d}" for n in range(41) if _held(n)}
    assert 0 < len(held_ids) < len(ids)  # the hash splits this set both ways

    data = await load_training_data(store, config)
    assert _events(data.heldout_pairs) == held_ids
    assert _events(data.train_pairs) == set(ids) - held_ids  # one completion's feedback is never on both sides
    [ranking] = [g for g in data.train_pairs + data.heldout_pairs if _events([g]) == {"fb-000000"}]
    assert len(ranking) == 3  # a ranking's pairs stay together
    assert data.train_pairs[0][0].prompt == [{"role": "user", "content": "question 0"}]  # text parts joined
    assert (data.train_pairs[0][0].chosen_choice, data.train_pairs[0][0].rejected_choice) == (0, 1)
    assert len(data.new_pair_ids) == 41 + 2 * 10 and len(data.new_label_ids) == 41
    assert {lb.reply for lb in data.train_labels} == {f"good {n}" for n in range(41) if not _held(n)}
    # Newer signal weighs more: the newest pair 1, one half-life (20 rows) older 1/2.
    newest = data.train_pairs[-1][-1] if not _held(40) else data.heldout_pairs[-1][-1]
    assert newest.weight == pytest.approx(1.0)
    assert min(p.weight for g in data.train_pairs for p in g) < 0.5 * max(p.weight for g in data.train_pairs for p in g)
    # Choice 1 of every completion was cut at its length limit when served (make_record): those replies are
    # known as truncated, the finished ones are not.
    assert {f"bad {n}" for n in range(41)} <= data.truncated_replies
    assert not {f"good {n}" for n in range(41)} & data.truncated_replies
    assert sorted(set(data.served_lengths)) == [2, 3]  # make_record's choices: 3 and 2 tokens
    prompts = data.ppo_prompts + data.gate_prompts
    assert len(prompts) == 40  # "question 1" twice counts once
    assert not set(map(str, data.ppo_prompts)) & set(map(str, data.gate_prompts))

    # After a run consumed them, nothing is new; a later run still learns from everything, the new first in weight.
    await store.mark_used("run-1", data.new_pair_ids, data.new_label_ids)
    assert await store.count_unused_signal() == (0, 0)
    await _feedback(store, 100)
    later = await load_training_data(store, config)
    assert later.new_pair_ids and len(later.new_pair_ids) == 1
    assert _events(later.train_pairs) == {*ids, "fb-000100"} - held_ids - ({"fb-000100"} if _held(100) else set())
    assert _events(later.heldout_pairs) >= held_ids  # held-out completions stay held out in every run
    # A cap keeps the newest: all the new rows, then the most recent older ones.
    capped = await load_training_data(store, DataConfig(heldout_fraction=0.2, max_pairs=5, max_labels=5))
    assert len(capped.new_pair_ids) == 1
    kept = {int(p.chosen.split()[-1]) for g in capped.train_pairs + capped.heldout_pairs for p in g}
    assert kept == {100, 40, 39, 38, 37}  # one pair each, the newest


def test_length_cap_follows_what_users_are_served() -> None:
    assert length_cap([], upper=256) == 256  # nothing served yet: the setting
    assert length_cap(list(range(1, 101)), upper=256) == 95  # the 95th percentile
    assert length_cap([400] * 10, upper=256) == 256  # never past the setting
    assert length_cap([3, 4, 5], upper=256) == 16  # nor below the floor


async def test_run_and_policy_rows_round_trip_and_orphans_fail(store: Store) -> None:
    now = datetime.now(UTC)
    run = RunRow(id="run-a", status="running", phase="ppo", progress=0.4, trigger="manual", parent=0,
                 candidate=None, promoted=False, config={"ppo": {"iterations": 2}}, metrics={"ppo": [{"kl": 0.1}]},
                 error=None, created=now, finished=None)
    await store.insert_run(run)
    await store.update_run("run-a", progress=0.5, metrics={"ppo": [{"kl": 0.1}, {"kl": 0.2}]})
    got = await store.get_run("run-a")
    assert got is not None and got.progress == 0.5 and len(got.metrics["ppo"]) == 2
    theirs = RunRow(**{**msgspec.structs.asdict(run), "id": "run-b", "config": {"owner": "replica-2:/data/runs"}})
    await store.insert_run(theirs)
    assert await store.fail_running_runs("the server stopped", now, owner="replica-1:/data/runs") == ["run-a"]
    assert (await store.get_run("run-b")).status == "running"  # another replica's run is left alone
    assert await store.fail_running_runs("the server stopped", now, owner="replica-2:/data/runs") == ["run-b"]
    failed = await store.get_run("run-a")
    assert failed is not None and failed.status == "failed" and failed.error == "the server stopped"
    assert await store.fail_running_runs("again", now) == []

    for version, status in ((0, "promoted"), (1, "candidate"), (2, "rejected")):
        await store.insert_policy(PolicyRow(version=version, status=status, parent=version - 1 if version else None,
                                            run_id=None, adapter_path=None, metrics={"reward": version}, reason=None,
                                            created=now, promoted_at=now if version == 0 else None))
    await store.set_promoted(1, now + timedelta(seconds=1), "test")
    rows: dict[int, Any] = {p.version: p for p in await store.list_policies()}
    assert [p.version for p in await store.list_policies()] == [2, 1, 0]
    assert rows[1].status == "promoted" and rows[0].status == "retired" and rows[2].status == "rejected"
    assert rows[1].promoted_at is not None and rows[1].reason == "test"


def test_reserved_versions_are_never_routed() -> None:
    router = PolicyRouter("alignd", lambda: [0, 1, RESERVED_VERSIONS + 3], promoted=1)
    assert router.resolve("alignd") == 1 and router.resolve("alignd@1") == 1
    assert router.model_names() == ["alignd", "alignd@0", "alignd@1"]
    try:
        router.resolve(f"alignd@{RESERVED_VERSIONS + 3}")
    except NotFound as e:
        assert e.code == "model_not_found"
    else:
        raise AssertionError("a trainer version was served")


async def test_after_a_failed_reward_model_check_the_trigger_waits_for_new_feedback(store: Store,
                                                                                   tmp_path: Any) -> None:
    """A run that stopped at the reward-model check used nothing: training again on the same feedback would re-test
    the same held-out set until chance passes it, so the automatic trigger waits for new signal beyond it."""
    from alignd.metrics import Metrics
    from alignd.policies.registry import PolicyRegistry
    from alignd.trainer.config import TrainerConfig
    from alignd.trainer.supervisor import TrainerSupervisor, TriggerPolicy

    metrics = Metrics()
    registry = PolicyRegistry(store, PolicyRouter("alignd", lambda: [0]), metrics, tmp_path / "policies",
                              max_rank=8, keep_loaded=1)
    supervisor = TrainerSupervisor(
        store, registry, metrics, base_model=lambda: "unused", database_url="unused", runs_dir=tmp_path / "runs",
        config=lambda request: TrainerConfig(), threads=1, run_timeout_s=None,
        trigger=TriggerPolicy(auto=True, min_new_pairs=4, min_new_labels=1000, min_interval_s=0.0))
    for n in range(6):
        await _feedback(store, n)
    assert await supervisor._due()
    await store.insert_run(RunRow(
        id="run-rm", status="failed", phase="reward_model", progress=0.3, trigger="auto", parent=0, candidate=None,
        promoted=False, config={}, metrics={"data": {"new_pairs": 6, "new_labels": 6}},
        error="RewardModelNotBetterThanChance: the reward model is not better than chance …",
        created=datetime.now(UTC) - timedelta(hours=1), finished=datetime.now(UTC)))
    assert not await supervisor._due()  # the same six pairs again: no
    for n in range(6, 9):
        await _feedback(store, n)
    assert not await supervisor._due()  # three new ones: fewer than the trigger's four
    await _feedback(store, 9)
    assert await supervisor._due()  # four new pairs beyond what the stopped run saw
