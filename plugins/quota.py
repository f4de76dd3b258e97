"""Per-user feedback quota (``feedback_per_minute``; off at 0): a token bucket per ``user``, refusing with 429 and
``Retry-After`` beyond it. Feedback without a user (neither in the body nor on the completion) is not limited.

The buckets live in this process: with several replicas, each allows the quota.
"""

from __future__ import annotations

import threading

from alignd import Feedback, PluginContext, Rejection, hookimpl
from alignd.limits import TokenBuckets  # one bucket per user here

NAME = "quota"


@hookimpl
def startup(context: PluginContext) -> None:
    if context.settings.plugins.feedback_per_minute:
        context.state[NAME] = TokenBuckets(context.settings.plugins.feedback_per_minute)
        context.state[f"{NAME}.lock"] = threading.Lock()  # filter_feedback runs in several threads at once


@hookimpl
def filter_feedback(feedback: Feedback, context: PluginContext) -> Rejection | None:
    buckets: TokenBuckets | None = context.state.get(NAME)
    if buckets is None or feedback.user is None:
        return None
    with context.state[f"{NAME}.lock"]:
        wait = buckets.take(feedback.user)
    if not wait:
        return None
    return Rejection(reason=f"User {feedback.user!r} sent more than {int(buckets.capacity)} feedback events in a "
                            f"minute; retry in {wait:.0f} s.", code="quota_exceeded", status=429, retry_after=wait)
