"""Deleting stored user text, on SQLite and PostgreSQL: retention removes old completions with every row derived from
them and keeps newer ones; per-user deletion removes every row of one end user (every table checked), is idempotent,
can be limited to one principal, and counts what it would remove beforehand. Policies and training runs stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select

from alignd.store import DeletedRows, PolicyRow, RunRow, Store
from alignd.store.tables import choices, completions, feedback, labels, policies, preference_pairs, training_runs
from tests import test_store
from tests.test_feedback_store import make_feedback
from tests.test_store import make_record

store_url = test_store.store_url
store = test_store.store

NOW = datetime.now(UTC)
TABLES = {"completions": completions, "choices": choices, "feedback": feedback, "preference_pairs": preference_pairs,
          "labels": labels, "policies": policies, "training_runs": training_runs}


async def table_counts(store: Store) -> dict[str, int]:
    async with store.engine.connect() as conn:
        return {name: (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                for name, table in TABLES.items()}


async def ids(store: Store, table: Any, column: str = "id") -> set[Any]:
    async with store.engine.connect() as conn:
        return set((await conn.execute(select(table.c[column]))).scalars())


async def add(store: Store, n: int, *, age: timedelta, user: str = "user", principal: str | None = None) -> str:
    """A completion ``age`` old with two choices."""
    record = make_record(n, created=NOW - age, user=user, principal=principal,
                         messages=[{"role": "user", "content": f"my e-mail is {user}@example.com"}])
    await store.record_completion(record)
    return record.id


async def judge(store: Store, n: int, completion_id: str, *, age: timedelta, user: str | None = "user",
                principal: str | None = None) -> str:
    """A feedback event with one pair and two labels."""
    event = make_feedback(n, completion_id, created=NOW - age, user=user, principal=principal)
    await store.record_feedback(event)
    return event.id


async def keep_registry_rows(store: Store) -> None:
    """A policy and a finished run, which no deletion may touch."""
    await store.insert_policy(PolicyRow(version=1, status="promoted", parent=0, run_id="run-1", adapter_path="/a",
                                        metrics={"gate": {"gain": 0.1}}, reason=None, created=NOW - timedelta(days=90),
                                        promoted_at=NOW - timedelta(days=90)))
    await store.insert_run(RunRow(id="run-1", status="succeeded", phase="done", progress=1.0, trigger="manual",
                                  parent=0, candidate=1, promoted=True, config={}, metrics={"pairs": 3}, error=None,
                                  created=NOW - timedelta(days=90), finished=NOW - timedelta(days=90)))


async def test_retention_deletes_old_completions_with_everything_derived_and_keeps_new_ones(store: Store) -> None:
    await keep_registry_rows(store)
    old = [await add(store, n, age=timedelta(days=40, minutes=n)) for n in range(5)]
    new = [await add(store, n, age=timedelta(days=29)) for n in range(5, 8)]
    old_events = [await judge(store, n, cid, age=timedelta(days=39)) for n, cid in enumerate(old)]
    late_event = await judge(store, 10, old[0], age=timedelta(hours=1))  # recent feedback on an old completion
    new_events = [await judge(store, 20 + n, cid, age=timedelta(days=1)) for n, cid in enumerate(new)]
    before = await table_counts(store)

    deleted = await store.delete_completions_before(NOW - timedelta(days=30), batch=2)  # three batches

    assert deleted == DeletedRows(completions=5, choices=10, feedback=6, preference_pairs=6, labels=12)
    after = await table_counts(store)
    assert {name: before[name] - after[name] for name in TABLES} == {
        **msgspec_dict(deleted), "policies": 0, "training_runs": 0}
    assert await ids(store, completions) == set(new)
    assert await ids(store, choices, "completion_id") == set(new)
    assert await ids(store, feedback) == set(new_events)
    assert not {*old_events, late_event} & (await ids(store, preference_pairs, "feedback_id")
                                                 | await ids(store, labels, "feedback_id"))
    assert await ids(store, preference_pairs, "feedback_id") == set(new_events)
    assert await store.delete_completions_before(NOW - timedelta(days=30)) == DeletedRows(), "nothing left to delete"


async def test_retention_of_an_empty_store_and_a_cutoff_without_timezone(store: Store) -> None:
    assert await store.delete_completions_before(NOW) == DeletedRows()
    try:
        await store.delete_completions_before(datetime(2025, 1, 1))
    except ValueError as e:
        assert "timezone" in str(e)
    else:
        raise AssertionError("a naive cutoff must be refused")


async def test_user_deletion_removes_every_row_of_the_user_and_nothing_else(store: Store) -> None:
    await keep_registry_rows(store)
    alice = [await add(store, n, age=timedelta(days=n), user="alice", principal="web") for n in range(3)]
    bob = await add(store, 3, age=timedelta(days=1), user="bob", principal="web")
    # Alice's own feedback, an admin's on Alice's completion, Alice's on Bob's, and Bob's own.
    alice_events = [await judge(store, n, cid, age=timedelta(hours=1), user="alice", principal="web")
                    for n, cid in enumerate(alice)]
    admin_on_alice = await judge(store, 10, alice[0], age=timedelta(hours=1), user="alice", principal="admin")
    alice_on_bob = await judge(store, 11, bob, age=timedelta(hours=1), user="alice", principal="web")
    bob_event = await judge(store, 12, bob, age=timedelta(hours=1), user="bob", principal="web")
    expected = DeletedRows(completions=3, choices=6, feedback=5, preference_pairs=5, labels=10)
    assert await store.count_user_rows("alice") == expected
    before = await table_counts(store)

    deleted = await store.delete_user("alice", batch=2)

    assert deleted == expected
    after = await table_counts(store)
    assert {name: before[name] - after[name] for name in TABLES} == {
        **msgspec_dict(deleted), "policies": 0, "training_runs": 0}
    async with store.engine.connect() as conn:
        for table in (completions, feedback):
            assert (await conn.execute(select(func.count()).select_from(table)
                                       .where(table.c.user == "alice"))).scalar_one() == 0
        for table in (preference_pairs, labels):
            gone = [*alice_events, admin_on_alice, alice_on_bob]
            assert (await conn.execute(select(func.count()).select_from(table).where(or_(
                table.c.feedback_id.in_(gone), table.c.completion_id.in_(alice))))).scalar_one() == 0
    assert await ids(store, completions) == {bob}
    assert await ids(store, feedback) == {bob_event}
    assert await store.count_user_rows("alice") == DeletedRows()
    assert await store.delete_user("alice") == DeletedRows(), "deleting again finds nothing"
    assert await store.delete_user("nobody") == DeletedRows()


async def test_user_deletion_limited_to_one_principal(store: Store) -> None:
    via_web = await add(store, 1, age=timedelta(days=1), user="alice", principal="web")
    via_app = await add(store, 2, age=timedelta(days=1), user="alice", principal="app")
    await judge(store, 1, via_web, age=timedelta(hours=1), user="alice", principal="web")
    kept = await judge(store, 2, via_app, age=timedelta(hours=1), user="alice", principal="app")
    assert await store.count_user_rows("alice", principal="web") == DeletedRows(
        completions=1, choices=2, feedback=1, preference_pairs=1, labels=2)
    assert (await store.delete_user("alice", principal="web")).completions == 1
    assert await ids(store, completions) == {via_app} and await ids(store, feedback) == {kept}


def database_files(folder: Path) -> bytes:
    """The SQLite database with its WAL and shared-memory files, concatenated."""
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith("alignd.db"))


def msgspec_dict(rows: DeletedRows) -> dict[str, int]:
    return {name: getattr(rows, name) for name in rows.__struct_fields__}


async def test_on_sqlite_the_deleted_text_leaves_the_files(tmp_path: Path) -> None:
    path = tmp_path / "alignd.db"
    async with await Store.open(f"sqlite:///{path}") as store:
        for n in range(30):
            await store.record_completion(make_record(n, user="alice" if n in (3, 4) else "bob", messages=[
                {"role": "user", "content": f"SECRET-{n}-SECRET " * 40}]))
        await store.record_feedback(make_feedback(1, "chatcmpl-000003", comment="PRIVATE-COMMENT " * 20))
        assert (await store.delete_user("alice")).completions == 2
        await store.delete_completions_before(NOW + timedelta(days=1000))  # the rest too, by retention
        on_disk = database_files(tmp_path)
        for text in (b"SECRET-3-SECRET", b"SECRET-4-SECRET", b"PRIVATE-COMMENT", b"SECRET-20-SECRET"):
            assert text not in on_disk, f"{text!r} is still in the database files"
