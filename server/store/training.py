"""Reads and writes of policy versions, training runs and the training signal (a mixin of the Store).

These writes are rare (a handful per run) and go straight to the database rather than through the group-commit
queue, which exists for the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from alignd.store.shared import LOCK_PROMOTE, LOCK_REGISTER, Fence, check_fence, serialize
from alignd.store.tables import (
    adapter_blobs,
    choices,
    completions,
    feedback,
    labels,
    policies,
    preference_pairs,
    promotion,
    training_runs,
)

__all__ = ["PolicyRow", "RunRow", "TrainingQueries"]


class PolicyRow(msgspec.Struct, kw_only=True):
    """A row of ``policies``."""

    version: int
    status: str
    """candidate | canary | promoted | rejected | retired (version 0, the base, starts promoted)"""
    parent: int | None
    run_id: str | None
    adapter_path: str | None
    """The PEFT adapter folder (None for the base)."""
    metrics: dict[str, Any]
    reason: str | None
    created: datetime
    promoted_at: datetime | None
    adapter_files: dict[str, str] | None = None
    """{file name: SHA-256} of the adapter's files in ``adapter_blobs`` (None: the folder is the only copy)."""


class RunRow(msgspec.Struct, kw_only=True):
    """A row of ``training_runs``."""

    id: str
    status: str
    """queued | running | succeeded | failed | cancelled"""
    phase: str
    progress: float
    trigger: str
    parent: int
    candidate: int | None
    promoted: bool
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    created: datetime
    finished: datetime | None
    holder: str | None = None
    """The instance id of the process running it, which holds the trainer lease meanwhile."""
    heartbeat: datetime | None = None
    lease_generation: int | None = None
    """The trainer lease's generation its holder started it under: its fencing token (None: a queued run, or one an
    alignd before fencing started)."""

    @property
    def fence(self) -> Fence | None:
        """What the writes of this run's trainer are fenced by (None: not fenced)."""
        if self.holder is None or self.lease_generation is None:
            return None
        return Fence(self.holder, self.lease_generation)


def _choice_version(version: int | None, choice: int | None, params: Any) -> int | None:
    """The version that wrote choice ``choice`` of a completion: its side-by-side's entry, else ``version``."""
    versions = params.get("side_by_side") if isinstance(params, dict) else None
    if isinstance(versions, list) and choice is not None and 0 <= choice < len(versions):
        return int(versions[choice])
    return version


def _row(struct: type[Any], row: Any) -> Any:
    return struct(**dict(row._mapping))


class TrainingQueries:
    """Policy registry rows, training runs, and the unused-signal bookkeeping (a mixin of ``Store``)."""

    _engine: AsyncEngine
    _write_engine: AsyncEngine

    def _check_open(self) -> None:  # provided by Store
        raise NotImplementedError

    # --- policies ---------------------------------------------------------------------------------------------

    async def insert_policy(self, row: PolicyRow) -> None:
        self._check_open()
        async with self._write_engine.begin() as conn:
            await conn.execute(insert(policies).values(**msgspec.structs.asdict(row)))

    async def register_policy(self, row: PolicyRow, blobs: Mapping[str, bytes],
                              adapter_path: Callable[[int], str], fence: Fence | None = None) -> PolicyRow:
        """Insert ``row`` as the next version, allocated here (its ``version`` is ignored), with its adapter's files
        (``blobs``, by SHA-256; those already stored are kept) in the same transaction: concurrent registrations get
        distinct versions, and a version's row never exists without its files. ``adapter_path(version)`` is the
        row's folder. Returns the row as inserted. With ``fence``: :class:`LeaseLost` (nothing written) unless the
        trainer lease is still the fence's."""
        self._check_open()
        now = datetime.now(UTC)
        async with self._write_engine.begin() as conn:
            await check_fence(conn, fence)
            await serialize(conn, LOCK_REGISTER)  # reading the highest version, then inserting the next
            stored = set((await conn.execute(select(adapter_blobs.c.sha256)
                                              .where(adapter_blobs.c.sha256.in_(list(blobs))))).scalars())
            for sha, data in blobs.items():
                if sha not in stored:
                    await conn.execute(insert(adapter_blobs).values(sha256=sha, data=data, size=len(data),
                                                                    created=now))
            top = (await conn.execute(select(func.max(policies.c.version)))).scalar()
            version = (top or 0) + 1
            row = msgspec.structs.replace(row, version=version, adapter_path=adapter_path(version))
            await conn.execute(insert(policies).values(**msgspec.structs.asdict(row)))
        return row

    async def set_promoted(self, version: int, when: datetime, reason: str | None = None) -> None:
        """Make ``version`` the one promoted policy, in one transaction: the previous one becomes ``retired``.
        Concurrent promotions are serialized (the last one wins); the partial unique index ``uq_policies_promoted``
        makes two promoted rows impossible whatever writes them. At once, without waiting for replicas to load it
        (the registry promotes in two phases: ``set_desired``, then ``flip``); the promotion row agrees."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await serialize(conn, LOCK_PROMOTE)
            await conn.execute(update(promotion).where(promotion.c.name == "policy")
                               .values(desired=version, served=version, desired_at=when, served_at=when, laggards={}))
            await conn.execute(update(policies).where(policies.c.status == "promoted", policies.c.version != version)
                               .values(status="retired"))
            values: dict[str, Any] = {"status": "promoted", "promoted_at": when}
            if reason is not None:
                values["reason"] = reason
            await conn.execute(update(policies).where(policies.c.version == version).values(**values))

    async def update_policy(self, version: int, *, status: str | None = None, metrics: dict[str, Any] | None = None,
                            reason: str | None = None, fence: Fence | None = None) -> None:
        """Change a version's status, metrics (replaced whole) or reason; only the fields given. With ``fence``:
        :class:`LeaseLost` (nothing written) unless the trainer lease is still the fence's."""
        self._check_open()
        values: dict[str, Any] = {k: v for k, v in (("status", status), ("metrics", metrics), ("reason", reason))
                                  if v is not None}
        if values:
            async with self._write_engine.begin() as conn:
                await check_fence(conn, fence)
                await conn.execute(update(policies).where(policies.c.version == version).values(**values))

    async def canary_policy(self) -> PolicyRow | None:
        """The version on canary, if any (at most one: the registry ends one before it starts another)."""
        self._check_open()
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(policies).where(policies.c.status == "canary")
                                      .order_by(policies.c.version.desc()))).first()
        return _row(PolicyRow, row) if row is not None else None

    async def version_outcomes(self, versions: Sequence[int], since: datetime) -> dict[int, dict[str, float]]:
        """Per version, what users made of its completions created since ``since``: ``completions``,
        ``latency_ms`` and ``completion_tokens`` (sums), ``good`` and ``bad`` (labels: thumbs, ratings), and
        ``side_by_side_wins`` / ``side_by_side_losses`` (picks between two versions' replies to one request)."""
        self._check_open()
        out = {v: {"completions": 0.0, "latency_ms": 0.0, "completion_tokens": 0.0, "good": 0.0, "bad": 0.0,
                   "side_by_side_wins": 0.0, "side_by_side_losses": 0.0} for v in versions}
        async with self._engine.connect() as conn:
            served = await conn.execute(
                select(completions.c.policy_version, func.count(), func.sum(completions.c.latency_ms),
                       func.sum(completions.c.completion_tokens))
                .where(completions.c.policy_version.in_(list(versions)), completions.c.created >= since)
                .group_by(completions.c.policy_version))
            for version, count, latency, tokens in served:
                out[version].update(completions=float(count), latency_ms=float(latency or 0),
                                    completion_tokens=float(tokens or 0))
            # A side-by-side's choices come from two versions (``params.side_by_side``): each label and pick counts
            # for the version of its choice.
            judged = await conn.execute(
                select(labels.c.policy_version, labels.c.good, labels.c.choice, completions.c.params)
                .join(completions, completions.c.id == labels.c.completion_id)
                .where(completions.c.policy_version.in_(list(versions)), completions.c.created >= since))
            for version, good, choice, params in judged:
                version = _choice_version(version, choice, params)
                if version in out:
                    out[version]["good" if good else "bad"] += 1.0
            picked = await conn.execute(
                select(preference_pairs.c.chosen_choice, preference_pairs.c.rejected_choice, completions.c.params)
                .join(completions, completions.c.id == preference_pairs.c.completion_id)
                .where(completions.c.policy_version.in_(list(versions)), completions.c.created >= since,
                       preference_pairs.c.chosen_choice.is_not(None), preference_pairs.c.rejected_choice.is_not(None)))
            for chosen, rejected, params in picked:
                winner, loser = _choice_version(None, chosen, params), _choice_version(None, rejected, params)
                if winner is not None and loser is not None and winner != loser and {winner, loser} <= set(out):
                    out[winner]["side_by_side_wins"] += 1.0
                    out[loser]["side_by_side_losses"] += 1.0
        return out

    async def promoted_version(self) -> int | None:
        """The version the database says is promoted (None before the base is recorded)."""
        self._check_open()
        async with self._engine.connect() as conn:
            return (await conn.execute(select(policies.c.version).where(policies.c.status == "promoted"))).scalar()

    async def get_policy(self, version: int) -> PolicyRow | None:
        self._check_open()
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(policies).where(policies.c.version == version))).first()
        return _row(PolicyRow, row) if row is not None else None

    async def list_policies(self) -> list[PolicyRow]:
        """Every version, newest first."""
        self._check_open()
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(policies).order_by(policies.c.version.desc()))
            return [_row(PolicyRow, r) for r in rows]

    # --- runs -------------------------------------------------------------------------------------------------

    async def insert_run(self, row: RunRow) -> None:
        self._check_open()
        async with self._write_engine.begin() as conn:
            await conn.execute(insert(training_runs).values(**msgspec.structs.asdict(row)))

    async def update_run(self, run_id: str, fence: Fence | None = None, **values: Any) -> None:
        """Write ``values`` into run ``run_id``. With ``fence`` (the run's trainer writing): :class:`LeaseLost`, and
        the row left as it is (the process that took the lease over marked it failed), unless the trainer lease is
        still the fence's."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await check_fence(conn, fence)
            await conn.execute(update(training_runs).where(training_runs.c.id == run_id).values(**values))

    async def get_run(self, run_id: str) -> RunRow | None:
        self._check_open()
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(training_runs).where(training_runs.c.id == run_id))).first()
        return _row(RunRow, row) if row is not None else None

    async def list_runs(self, limit: int = 50, status: str | None = None) -> list[RunRow]:
        """Runs, newest first."""
        self._check_open()
        query = select(training_runs).order_by(training_runs.c.created.desc(), training_runs.c.id).limit(limit)
        if status is not None:
            query = query.where(training_runs.c.status == status)
        async with self._engine.connect() as conn:
            return [_row(RunRow, r) for r in await conn.execute(query)]

    async def oldest_queued_run(self) -> RunRow | None:
        """The run waiting longest for the trainer process (runs are taken first in, first out)."""
        self._check_open()
        query = (select(training_runs).where(training_runs.c.status == "queued")
                 .order_by(training_runs.c.created, training_runs.c.id).limit(1))
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _row(RunRow, row) if row is not None else None

    async def claim_queued_run(self, run_id: str, **values: Any) -> RunRow | None:
        """Turn queued run ``run_id`` into ``values`` (its start) and return the row as written: one conditional
        UPDATE, so a cancel racing it either lands first (then None: it is no longer queued) or finds it running."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            claimed = (await conn.execute(update(training_runs)
                                          .where(training_runs.c.id == run_id, training_runs.c.status == "queued")
                                          .values(**values).returning(*training_runs.c))).first()
        return _row(RunRow, claimed) if claimed is not None else None

    async def end_queued_run(self, run_id: str, status: str, error: str, when: datetime) -> bool:
        """Settle a run that never started (``cancelled`` by an operator, or ``failed``); False when it is not
        queued."""
        return await self.claim_queued_run(run_id, status=status, error=error, finished=when) is not None

    async def fail_running_runs(self, error: str, when: datetime, owner: str | None = None) -> list[str]:
        """Mark runs still ``running`` as failed (their process is gone); returns their ids. With ``owner``, only
        the runs that owner started (``config["owner"]``) or that name none: another replica's runs are alive."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            rows = await conn.execute(select(training_runs.c.id, training_runs.c.config)
                                      .where(training_runs.c.status == "running"))
            ids = [r.id for r in rows if owner is None or (r.config or {}).get("owner") in (None, owner)]
            if ids:
                await conn.execute(update(training_runs).where(training_runs.c.id.in_(ids))
                                   .values(status="failed", error=error, finished=when))
        return ids

    # --- training signal --------------------------------------------------------------------------------------

    async def count_unused_signal(self) -> tuple[int, int]:
        """Preference pairs and labels no run has trained on yet."""
        self._check_open()
        async with self._engine.connect() as conn:
            pairs = (await conn.execute(select(func.count()).select_from(preference_pairs)
                                        .where(preference_pairs.c.used_in_run.is_(None)))).scalar_one()
            unpaired = (await conn.execute(select(func.count()).select_from(labels)
                                           .where(labels.c.used_in_run.is_(None)))).scalar_one()
        return pairs, unpaired

    async def signal_rows(self, table_name: str, *, used: bool, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` rows of ``preference_pairs`` or ``labels``: unused ones oldest first, or (``used``) the
        most recent used ones (the replay pool). Each carries its feedback event's ``user``, ``principal``,
        ``event_choice`` and ``event_payload`` (who judged, and what: the training-data safeguards need them)."""
        self._check_open()
        table = {"preference_pairs": preference_pairs, "labels": labels}[table_name]
        query = select(table, feedback.c.user, feedback.c.principal, feedback.c.choice.label("event_choice"),
                       feedback.c.payload.label("event_payload")).join(feedback, feedback.c.id == table.c.feedback_id)
        if used:
            query = query.where(table.c.used_in_run.is_not(None)).order_by(table.c.id.desc())
        else:
            query = query.where(table.c.used_in_run.is_(None)).order_by(table.c.id)
        async with self._engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(query.limit(limit))]

    async def silent_events(self, completion_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Feedback events on these completions that made no pair and no label (a pairwise ``tie``): a later one
        withdraws its user's earlier judgement of the same choices (:func:`alignd.trainer.safeguards.collapse`)."""
        self._check_open()
        ids = sorted(set(completion_ids))
        columns = (feedback.c.id.label("feedback_id"), feedback.c.completion_id, feedback.c.kind, feedback.c.created,
                   feedback.c.user, feedback.c.principal, feedback.c.choice.label("event_choice"),
                   feedback.c.payload.label("event_payload"))
        found: list[dict[str, Any]] = []
        async with self._engine.connect() as conn:
            for start in range(0, len(ids), 500):
                query = select(*columns).where(feedback.c.completion_id.in_(ids[start:start + 500]),
                                               feedback.c.pair_count == 0, feedback.c.label_count == 0)
                found.extend(dict(r._mapping) for r in await conn.execute(query))
        return found

    async def mark_used(self, run_id: str, pair_ids: Sequence[int], label_ids: Sequence[int],
                        fence: Fence | None = None) -> None:
        """Record that ``run_id`` trained on these rows (rows already used keep their first run). With ``fence``:
        :class:`LeaseLost` (nothing written) unless the trainer lease is still the fence's."""
        self._check_open()
        async with self._write_engine.begin() as conn:
            await check_fence(conn, fence)
            for table, ids in ((preference_pairs, pair_ids), (labels, label_ids)):
                for start in range(0, len(ids), 500):
                    await conn.execute(update(table).where(table.c.id.in_(list(ids[start:start + 500])),
                                                           table.c.used_in_run.is_(None))
                                       .values(used_in_run=run_id))

    async def served_reply_lengths(self, limit: int) -> list[int]:
        """Token counts of the most recent choices users were served (aborted ones left out)."""
        self._check_open()
        query = (select(choices.c.token_ids).join(completions, completions.c.id == choices.c.completion_id)
                 .where(choices.c.finish_reason.in_(("stop", "length")))
                 .order_by(completions.c.created.desc()).limit(limit))
        async with self._engine.connect() as conn:
            return [len(r.token_ids) for r in await conn.execute(query)]

    async def truncated_choices(self, completion_ids: Sequence[str]) -> set[tuple[str, int]]:
        """``(completion id, choice index)`` of the choices among these completions that were cut at their
        length limit (``finish_reason`` "length")."""
        self._check_open()
        found: set[tuple[str, int]] = set()
        ids = sorted(set(completion_ids))
        async with self._engine.connect() as conn:
            for start in range(0, len(ids), 500):
                query = select(choices.c.completion_id, choices.c.index).where(
                    choices.c.completion_id.in_(ids[start:start + 500]), choices.c.finish_reason == "length")
                found.update((r.completion_id, r.index) for r in await conn.execute(query))
        return found

    async def recent_prompts(self, limit: int) -> list[list[dict[str, Any]]]:
        """The request messages of the most recent completions, newest first (duplicates included)."""
        self._check_open()
        query = select(completions.c.messages).order_by(completions.c.created.desc()).limit(limit)
        async with self._engine.connect() as conn:
            return [r.messages for r in await conn.execute(query)]
