"""Per-caller limits on chat: a token bucket for the request rate and a cap on requests in flight, so that one caller
cannot starve another. A refused request is a 429 with ``Retry-After``; nothing waits in a queue.

A caller is an API key (kept as a hash, never the key itself) or, with no keys configured, a client address. The
counts live in this process: with several replicas, each allows the limits.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alignd.errors import RateLimited

_MAX_CALLERS = 100_000  # forget full buckets beyond this many callers (addresses are not a bounded set)


def key_caller(key: str) -> str:
    """The caller a key stands for: a short hash, safe to keep and log."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class TokenBuckets:
    """``per_minute`` tokens per name, refilled continuously; a bucket holds a minute's worth."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, name: str, now: float | None = None) -> float:
        """Spend one token of ``name``; return 0 when allowed, else the seconds until a token is back."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(name, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[name] = (tokens - 1.0, now)
        if len(self._buckets) > _MAX_CALLERS:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        for name, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.capacity:
                del self._buckets[name]


@dataclass
class Lease:
    """One admitted request's slot; give it back once (``with lease:`` or :meth:`release`)."""

    _release: Callable[[], None] | None = field(repr=False)

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class ChatLimits:
    """``requests_per_minute`` and ``max_concurrent`` per caller; 0 turns either off."""

    def __init__(self, requests_per_minute: int, max_concurrent: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.requests_per_minute = requests_per_minute
        self.max_concurrent = max_concurrent
        self._buckets = TokenBuckets(requests_per_minute) if requests_per_minute else None
        self._in_flight: dict[str, int] = {}
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self._buckets or self.max_concurrent)

    def in_flight(self, caller: str) -> int:
        return self._in_flight.get(caller, 0)

    def admit(self, caller: str) -> Lease:
        """A slot for one request of ``caller``, or :class:`RateLimited` (429 with ``Retry-After``)."""
        busy = self._in_flight.get(caller, 0)
        # Concurrency first: a request refused for it spends no token of the rate.
        if self.max_concurrent and busy >= self.max_concurrent:
            # When a slot frees is unknown; 1-3 s spreads the retries of many refused clients instead of bringing
            # them all back in the same instant.
            raise RateLimited(f"Too many chat requests in flight for this caller (at most {self.max_concurrent}); "
                              "retry when one has finished.", code="too_many_concurrent_requests",
                              headers={"Retry-After": str(random.randint(1, 3))})
        if self._buckets is not None and (wait := self._buckets.take(caller, self._clock())):
            raise RateLimited(f"More than {self.requests_per_minute} chat requests a minute from this caller; "
                              f"retry in {math.ceil(wait)} s.", headers={"Retry-After": str(math.ceil(wait))})
        if not self.max_concurrent:
            return Lease(None)
        self._in_flight[caller] = busy + 1
        return Lease(lambda: self._done(caller))

    def _done(self, caller: str) -> None:
        left = self._in_flight[caller] - 1
        if left:
            self._in_flight[caller] = left
        else:
            del self._in_flight[caller]
