"""Feedback volume by kind per hour and per day (``Store.feedback_volume``, behind ``GET /v1/feedback/stats``) on
SQLite and on PostgreSQL, whose session time zone is deliberately not UTC: buckets are UTC hours and days."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from alignd.store import Store
from tests.test_feedback_store import make_feedback
from tests.test_store import _create_database, _drop_database, make_record

# Around midnight UTC, where a time zone mistake moves events into the wrong day.
MIDNIGHT = datetime(2025, 3, 5, tzinfo=UTC)
EVENTS = [
    ("thumbs", MIDNIGHT - timedelta(minutes=30)),  # 23:30 on the 4th
    ("rating", MIDNIGHT - timedelta(microseconds=1)),  # 23:59:59.999999 on the 4th
    ("thumbs", MIDNIGHT),  # 00:00 on the 5th
    ("thumbs", MIDNIGHT + timedelta(minutes=45)),
    ("edit", MIDNIGHT + timedelta(hours=3, minutes=10)),
]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store; on PostgreSQL its database's time zone is +05:30, so that both day and hour boundaries
    would move if the query used the session's zone instead of UTC."""
    if request.param == "sqlite":
        s = await Store.open(f"sqlite:///{tmp_path / 'alignd.db'}")
        try:
            yield s
        finally:
            await s.close()
        return
    server_url: str = request.getfixturevalue("postgres_server_url")
    name, url = await _create_database(server_url)
    conn = await asyncpg.connect(make_url(server_url).set(drivername="postgresql").render_as_string(
        hide_password=False))
    try:
        await conn.execute(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Kolkata'")
    finally:
        await conn.close()
    s = await Store.open(url)
    try:
        yield s
    finally:
        await s.close()
        await _drop_database(server_url, name)


async def record_events(store: Store) -> None:
    await store.record_completion(make_record(1))
    for n, (kind, created) in enumerate(EVENTS, start=1):
        await store.record_feedback(make_feedback(n, kind=kind, created=created))


async def test_volume_per_hour_and_day_in_utc(store: Store) -> None:
    await record_events(store)
    hour = timedelta(hours=1)
    assert await store.feedback_volume(bucket="hour") == [
        (MIDNIGHT - hour, "rating", 1), (MIDNIGHT - hour, "thumbs", 1),
        (MIDNIGHT, "thumbs", 2),
        (MIDNIGHT + 3 * hour, "edit", 1),
    ]
    day = timedelta(days=1)
    assert await store.feedback_volume(bucket="day") == [
        (MIDNIGHT - day, "rating", 1), (MIDNIGHT - day, "thumbs", 1),
        (MIDNIGHT, "edit", 1), (MIDNIGHT, "thumbs", 2),
    ]
    for start, _, _ in await store.feedback_volume(bucket="hour"):
        assert start.tzinfo is not None and start.utcoffset() == timedelta(0)


async def test_volume_since(store: Store) -> None:
    await record_events(store)
    assert await store.feedback_volume(bucket="day", since=MIDNIGHT) == [(MIDNIGHT, "edit", 1),
                                                                         (MIDNIGHT, "thumbs", 2)]
    # ``since`` is an instant, whatever zone it is written in: 05:30 in Kolkata is midnight UTC.
    kolkata = datetime(2025, 3, 5, 5, 30, tzinfo=ZoneInfo("Asia/Kolkata"))
    assert await store.feedback_volume(bucket="day", since=kolkata) == [(MIDNIGHT, "edit", 1),
                                                                        (MIDNIGHT, "thumbs", 2)]
    assert await store.feedback_volume(bucket="hour", since=MIDNIGHT + timedelta(days=1)) == []
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.feedback_volume(bucket="hour", since=MIDNIGHT.replace(tzinfo=None))


async def test_volume_of_an_empty_store(store: Store) -> None:
    assert await store.feedback_volume(bucket="hour") == []
    assert await store.feedback_volume(bucket="day") == []
