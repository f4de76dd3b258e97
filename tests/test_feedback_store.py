"""Feedback in the store, on SQLite and PostgreSQL: events with their pairs and labels committed together (group
commit), idempotency keys, history, listing with filters and pages, exports, and the schema migration."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from alignd.store import (
    FeedbackRecord,
    Label,
    PreferencePair,
    RecordRejectedError,
    Store,
)
from tests import test_store
from tests.test_store import make_record

# The store fixtures of test_store.py: every test here runs on SQLite and on PostgreSQL.
store_url = test_store.store_url
store = test_store.store

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
PROMPT = [{"role": "user", "content": "question"}]


def make_feedback(n: int, completion_id: str = "chatcmpl-000001", **overrides: Any) -> FeedbackRecord:
    fields: dict[str, Any] = {
        "id": f"fb-{n:06d}", "completion_id": completion_id, "kind": "thumbs" if n % 2 else "rating",
        "choice": n % 2, "payload": {"value": "up", "choice": n % 2}, "user": f"user-{n % 3}",
        "comment": f"comment {n} ☃", "tags": ["a", "b"], "idempotency_key": None, "request_hash": f"h{n}",
        "policy_version": 1, "created": T0 + timedelta(seconds=n),
        "pairs": [PreferencePair(prompt=PROMPT, chosen=f"good {n}", rejected=f"bad {n}", margin=0.5, weight=1 / 3,
                             chosen_choice=0, rejected_choice=1)],
        "labels": [Label(prompt=PROMPT, reply=f"good {n}", good=True, choice=0),
                   Label(prompt=PROMPT, reply=f"bad {n}", good=False, weight=2.0, choice=1)],
    }
    fields.update(overrides)
    return FeedbackRecord(**fields)


async def collect(pages: Any) -> list[Any]:
    return [row async for page in pages for row in page]


async def test_feedback_round_trip_with_pairs_and_labels(store: Store) -> None:
    await store.record_completion(make_record(1))
    await store.record_feedback(make_feedback(1, idempotency_key="key-1"))
    assert await store.count_feedback() == (1, 1, 2)
    stored = await store.feedback_by_key("key-1")
    assert stored is not None and stored.id == "fb-000001" and stored.created == T0 + timedelta(seconds=1)
    assert (stored.payload, stored.tags, stored.comment) == ({"value": "up", "choice": 1}, ["a", "b"], "comment 1 ☃")
    assert (stored.pair_count, stored.label_count, stored.request_hash) == (1, 2, "h1")
    [pair] = await collect(store.iter_pairs())
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin, pair.weight) == (PROMPT, "good 1", "bad 1", 0.5,
                                                                                   pytest.approx(1 / 3))
    assert (pair.feedback_id, pair.completion_id, pair.kind, pair.policy_version) == (
        "fb-000001", "chatcmpl-000001", "thumbs", 1)
    labels = await collect(store.iter_labels())
    assert [(lb.reply, lb.good, lb.weight, lb.choice) for lb in labels] == [("good 1", True, 1.0, 0),
                                                                            ("bad 1", False, 2.0, 1)]
    brief, history = await store.feedback_context("chatcmpl-000001", history_kind="thumbs")
    assert brief is not None and [c.text for c in brief.choices] == ["answer 1", "other answer 1"]
    assert all(c.token_ids == [] for c in brief.choices) and brief.messages == [{"role": "user",
                                                                                  "content": "question 1"}]
    assert [f.id for f in history] == ["fb-000001"]
    assert await store.feedback_context("chatcmpl-000001", completion=False, history_kind="rating") == (None, [])
    assert await store.feedback_context("nope") == (None, [])


async def test_bad_events_fail_only_their_own_callers(store: Store) -> None:
    """A duplicate idempotency key or an unknown completion in a group commit fails that event alone."""
    await store.record_completion(make_record(1))
    await store.record_feedback(make_feedback(0, idempotency_key="taken"))
    events = [make_feedback(n) for n in range(1, 21)]
    events[3] = make_feedback(4, idempotency_key="taken")
    events[7] = make_feedback(8, completion_id="chatcmpl-missing")
    results = await asyncio.gather(*(store.record_feedback(e) for e in events), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, RecordRejectedError)]
    assert failed == [3, 7], results
    assert all(r is None for i, r in enumerate(results) if i not in failed)
    assert (await store.count_feedback())[0] == 19


async def test_concurrent_events_are_group_committed_and_none_is_lost(store: Store) -> None:
    await store.record_completion(make_record(1))
    batches = store.stats.batches
    await asyncio.gather(*(store.record_feedback(make_feedback(n)) for n in range(400)))
    assert await store.count_feedback() == (400, 400, 800)
    assert store.stats.batches - batches < 400 / 4, "concurrent events must share transactions"


async def test_history_listing_filters_and_pages(store: Store) -> None:
    await store.record_completion(make_record(1))
    await store.record_completion(make_record(2))
    for n in range(10):
        await store.record_feedback(make_feedback(n, completion_id=f"chatcmpl-00000{1 + n % 2}"))
    history = await store.list_feedback(completion_id="chatcmpl-000001", kind="rating")
    assert [f.id for f in history] == ["fb-000000", "fb-000002", "fb-000004", "fb-000006", "fb-000008"]
    everything = await store.list_feedback(limit=100)
    assert [f.id for f in everything] == [f"fb-{n:06d}" for n in range(10)]
    page1 = await store.list_feedback(limit=4)
    page2 = await store.list_feedback(limit=4, after=page1[-1].id)
    page3 = await store.list_feedback(limit=4, after=page2[-1].id)
    assert [f.id for f in page1 + page2 + page3] == [f.id for f in everything]
    assert await store.list_feedback(after="fb-unknown") == []
    assert [f.id for f in await store.list_feedback(kind="thumbs", user="user-1")] == ["fb-000001", "fb-000007"]
    assert [f.id for f in await store.list_feedback(since=T0 + timedelta(seconds=8))] == ["fb-000008", "fb-000009"]
    assert len(await store.list_feedback(completion_id="chatcmpl-000002")) == 5
    with pytest.raises(ValueError, match="timezone"):
        await store.list_feedback(since=datetime(2025, 1, 1))


async def test_exports_page_through_everything(store: Store) -> None:
    await store.record_completion(make_record(1))
    await asyncio.gather(*(store.record_feedback(make_feedback(n)) for n in range(11)))
    pairs = await collect(store.iter_pairs(page=3))
    assert sorted(p.feedback_id for p in pairs) == [f"fb-{n:06d}" for n in range(11)]
    assert len({p.id for p in pairs}) == 11
    labels = await collect(store.iter_labels(page=4, since=T0 + timedelta(seconds=5)))
    assert len(labels) == 12
    assert await collect(store.iter_pairs(policy_version=7)) == []
    events = await collect(store.iter_feedback(page=2))
    assert [e.id for e in events] == [f"fb-{n:06d}" for n in range(11)]
    context = await store.prompts_and_choices(["chatcmpl-000001", "chatcmpl-000001"])
    assert context == {"chatcmpl-000001": ([{"role": "user", "content": "question 1"}],
                                           ["answer 1", "other answer 1"])}
