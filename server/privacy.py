"""End users: retention (completions older than ``--retain-days`` deleted periodically, or now on an operator's
request) and per-user deletion, over the store's deletions (:mod:`alignd.store.deletion`); and each user's trust
state (an operator's) and agreement score (a training run's, :mod:`alignd.trainer.safeguards`).

Both remove a completion with everything derived from it (choices, feedback, preference pairs, labels). A training
run in progress is not waited for: it read its pairs, labels and prompts when it started, and rows deleted since
are simply not marked as used by it; what it learns from them stays in its adapter, as with every earlier run.
Logs name a user by a short hash of its id only, so that they do not keep what was deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import UTC, datetime, timedelta

import msgspec

from alignd.config import Settings
from alignd.errors import NotFound, Unprocessable
from alignd.feedback.service import FeedbackService
from alignd.feedback.types import iso
from alignd.metrics import Metrics
from alignd.principals import Principal
from alignd.protocol import (
    RetentionRun,
    RowCounts,
    TrustState,
    UserData,
    UserDeletion,
    UserListQuery,
    UserTrust,
    UserTrustList,
    UserTrustUpdate,
)
from alignd.store import DeletedRows, Store
from alignd.store.users import EndUserRow

__all__ = ["PrivacyService", "user_ref"]

log = logging.getLogger(__name__)

# The longest end-user id accepted (the chat and feedback APIs take any string; ids longer than this are not ids).
_MAX_USER_LENGTH = 256


def user_ref(user: str) -> str:
    """How logs name an end user: a short digest, which the operator who asked can match, and nobody can read."""
    return "sha256:" + hashlib.sha256(user.encode()).hexdigest()[:12]


def _counts(rows: DeletedRows) -> RowCounts:
    return RowCounts(**msgspec.structs.asdict(rows))


def _check_user(user: str) -> None:
    if not user or len(user) > _MAX_USER_LENGTH:
        raise Unprocessable(f"The user id must be 1 to {_MAX_USER_LENGTH} characters.", param="user")


class PrivacyService:
    """Retention and per-user deletion for one app."""

    def __init__(self, store: Store, feedback: FeedbackService, metrics: Metrics, settings: Settings) -> None:
        self.store = store
        self.feedback = feedback
        self.metrics = metrics
        self.retain_days = settings.store.retain_days
        self.interval_s = settings.store.retention_interval_s

    # --- per user --------------------------------------------------------------------------------------------

    async def user_data(self, user: str, principal: str | None = None) -> UserData:
        """What the store holds of ``user`` (404 when nothing)."""
        _check_user(user)
        rows = await self.store.count_user_rows(user, principal=principal)
        trust = await self.store.get_end_user(user)
        if not rows.total and trust is None:
            within = f" made with principal {principal!r}'s keys" if principal is not None else ""
            raise NotFound(f"No stored completions or feedback of user {user!r}{within}.", param="user",
                           code="user_not_found")
        return UserData(user=user, principal=principal, rows=_counts(rows),
                        trust=_trust(trust) if trust is not None else UserTrust(user=user))

    async def delete_user(self, user: str, principal: str | None = None, *,
                          by: Principal | None = None) -> UserDeletion:
        """Delete every row of ``user`` (see :meth:`alignd.store.Store.delete_user`); idempotent."""
        _check_user(user)
        deleted = await self.store.delete_user(user, principal=principal)
        if principal is None:  # what runs measured of them goes too; an operator's trust state stays
            await self.store.forget_user_scores(user)
        self._deleted(deleted, "user")
        log.info("deleted the rows of user %s%s at the request of %s: %s", user_ref(user),
                 f" (principal {principal})" if principal is not None else "", by.name if by else "an open server",
                 _summary(deleted))
        return UserDeletion(user=user, principal=principal, deleted=_counts(deleted))

    # --- trust ---------------------------------------------------------------------------------------------

    async def set_trust(self, user: str, update: UserTrustUpdate, *, by: Principal | None = None) -> UserTrust:
        """Set ``user``'s trust state: ``blocked`` leaves their feedback out of every later run (it is still
        stored and accepted: unblocking gives it back), ``trusted`` exempts them from the agreement check."""
        _check_user(user)
        row = await self.store.set_trust(user, update.trust, note=update.note, by=by.name if by else None,
                                         when=datetime.now(UTC))
        log.info("trust of user %s set to %s by %s", user_ref(user), update.trust, by.name if by else "an open server")
        return _trust(row)

    async def list_users(self, query: UserListQuery) -> UserTrustList:
        """Users with a trust state or a score, flagged ones first."""
        rows = await self.store.list_end_users(flagged=query.flagged, trust=query.trust, limit=query.limit)
        return UserTrustList(data=[_trust(row) for row in rows])

    # --- retention -------------------------------------------------------------------------------------------

    async def enforce_retention(self, older_than_days: int | None = None) -> RetentionRun:
        """Delete the completions older than ``older_than_days`` (default: ``--retain-days``) with everything
        derived from them."""
        days = older_than_days if older_than_days is not None else self.retain_days
        if days is None:
            raise Unprocessable("Retention is off (--retain-days is unset): say how old is too old with "
                                "older_than_days.", param="older_than_days", code="retention_off")
        cutoff = datetime.now(UTC) - timedelta(days=days)
        deleted = await self.store.delete_completions_before(cutoff)
        self._deleted(deleted, "retention")
        self.metrics.retention_last_success.set(time.time())
        if deleted.total:
            log.info("retention: deleted what was older than %d days (before %s): %s", days, iso(cutoff),
                     _summary(deleted))
        return RetentionRun(older_than_days=days, cutoff=iso(cutoff), deleted=_counts(deleted))

    async def run_retention(self) -> None:
        """Enforce ``--retain-days`` now and every ``--retention-interval-s`` until cancelled; a failed pass (the
        database away) is logged, counted and retried at the next interval."""
        while True:
            try:
                await self.enforce_retention()
            except Exception:
                self.metrics.retention_failures.inc()
                log.exception("retention pass failed; retrying in %.0f s", self.interval_s)
            await asyncio.sleep(self.interval_s)

    def _deleted(self, deleted: DeletedRows, reason: str) -> None:
        if not deleted.total:
            return
        self.feedback.forget_cached()  # completions and histories kept in memory may be among them
        for table, count in msgspec.structs.asdict(deleted).items():
            if count:
                self.metrics.deleted_rows.labels(table, reason).inc(count)


def _trust(row: EndUserRow) -> UserTrust:
    state: TrustState = row.trust  # type: ignore[assignment] # the store only holds the three states
    return UserTrust(user=row.user, trust=state, note=row.note,
                     updated=iso(row.updated) if row.updated else None, updated_by=row.updated_by,
                     flagged=row.flagged, agreement=row.agreement, judgements=row.judgements, p_value=row.p_value,
                     scored_run=row.scored_run, scored=iso(row.scored) if row.scored else None)


def _summary(deleted: DeletedRows) -> str:
    return ", ".join(f"{count} {table}" for table, count in msgspec.structs.asdict(deleted).items())
