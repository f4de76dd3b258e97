"""Per-user feedback quota (``feedback_per_minute``; off at 0), refusing with 429 and ``Retry-After`` beyond it.
Feedback without a user (neither in the body nor on the completion) is not limited.

On PostgreSQL (replicas share the store) the counters are in the database (``quota_counters``), so N replicas
enforce one quota: a sliding minute estimated from two fixed ones, each event counted in one transaction that locks
its counter row, so concurrent events on any replicas never let more through than the quota (see
:meth:`alignd.store.Store.take_quota`). On SQLite one process owns the store, and a token bucket per user in this
process is exact and costs no write.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from alignd import Feedback, PluginContext, Rejection, hookimpl
from alignd.limits import TokenBuckets  # one bucket per user here

NAME = "quota"
WINDOW_S = 60


class SharedQuota:
    """The quota in the shared database, called from plugin threads (the store lives on the app's event loop)."""

    def __init__(self, store: Any, per_minute: int, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.store, self.capacity, self.loop, self.timeout_s = store, float(per_minute), loop, timeout_s
        self._forgotten = 0  # the window before which counters were last deleted

    def take(self, user: str) -> float:
        """0 when ``user`` may send one more event now, else the seconds to wait. A database failure raises: the
        event is refused with an error (the client retries) rather than let through unlimited."""
        now = time.time()
        wait = asyncio.run_coroutine_threadsafe(
            self.store.take_quota(user, int(self.capacity), WINDOW_S, now), self.loop).result(self.timeout_s)
        window = int(now // WINDOW_S) * WINDOW_S
        if window > self._forgotten:  # once a window per process: counters two windows old serve no estimate
            self._forgotten = window
            asyncio.run_coroutine_threadsafe(self.store.forget_quota_windows(window - WINDOW_S), self.loop)
        return wait


@hookimpl
def startup(context: PluginContext) -> None:
    per_minute = context.settings.plugins.feedback_per_minute
    if not per_minute:
        return
    store = context.store
    if store is not None and not store.embedded:
        context.state[NAME] = SharedQuota(store, per_minute, asyncio.get_running_loop(),
                                          context.settings.plugins.hook_timeout_s)
    else:
        context.state[NAME] = TokenBuckets(per_minute)
    context.state[f"{NAME}.lock"] = threading.Lock()  # filter_feedback runs in several threads at once


@hookimpl
def filter_feedback(feedback: Feedback, context: PluginContext) -> Rejection | None:
    quota: TokenBuckets | SharedQuota | None = context.state.get(NAME)
    if quota is None or feedback.user is None:
        return None
    if isinstance(quota, SharedQuota):
        wait = quota.take(feedback.user)
    else:
        with context.state[f"{NAME}.lock"]:
            wait = quota.take(feedback.user)
    if not wait:
        return None
    return Rejection(reason=f"User {feedback.user!r} sent more than {int(quota.capacity)} feedback events in a "
                            f"minute; retry in {wait:.0f} s.", code="quota_exceeded", status=429, retry_after=wait)
