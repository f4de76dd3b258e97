"""Per-user feedback quota (``feedback_per_minute``; off at 0): a token bucket per ``user``, refusing with 429 and
``Retry-After`` beyond it. Feedback without a user (neither in the body nor on the completion) is not limited.

The buckets live in this process: with several replicas, each allows the quota.
"""

from __future__ import annotations

import time

from alignd import Feedback, PluginContext, Rejection, hookimpl

NAME = "quota"
_MAX_USERS = 100_000  # forget full buckets beyond this many users


class TokenBuckets:
    """``per_minute`` tokens per user, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, user: str, now: float | None = None) -> float:
        """Spend one token of ``user``; return 0 when allowed, else the seconds until a token is back."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(user, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[user] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[user] = (tokens - 1.0, now)
        if len(self._buckets) > _MAX_USERS:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        for user, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.capacity:
                del self._buckets[user]


@hookimpl
def startup(context: PluginContext) -> None:
    if context.settings.plugins.feedback_per_minute:
        context.state[NAME] = TokenBuckets(context.settings.plugins.feedback_per_minute)


@hookimpl
def filter_feedback(feedback: Feedback, context: PluginContext) -> Rejection | None:
    buckets: TokenBuckets | None = context.state.get(NAME)
    if buckets is None or feedback.user is None:
        return None
    wait = buckets.take(feedback.user)
    if not wait:
        return None
    return Rejection(reason=f"User {feedback.user!r} sent more than {int(buckets.capacity)} feedback events in a "
                            f"minute; retry in {wait:.0f} s.", code="quota_exceeded", status=429, retry_after=wait)
