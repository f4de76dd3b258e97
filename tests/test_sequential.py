"""The live test's statistics, as pure functions: the always-valid confidence sequence of a rate, its level under
continuous monitoring, and the canary's verdicts (promote, reject on a loss, an error or latency regression, an
exhausted budget; go on otherwise)."""

from __future__ import annotations

import random

import pytest

from alignd.policies.canary import CanaryConfig, VersionFigures, judge_canary
from alignd.policies.sequential import compare_rates, rate_sequence

CONFIG = CanaryConfig(confidence=0.95, max_s=3600, max_requests=1000, min_completions=20, max_latency_ratio=1.5)


def test_the_sequence_covers_the_observed_rate_and_narrows() -> None:
    assert rate_sequence(0, 0, 0.05) == (0.0, 1.0)
    low, high = rate_sequence(30, 40, 0.05)
    assert low < 0.75 < high and 0.5 < low  # 30 of 40 at 95%: conclusively above one half
    wide, narrow = rate_sequence(15, 20, 0.05), rate_sequence(150, 200, 0.05)
    assert wide[0] < narrow[0] < 0.75 < narrow[1] < wide[1]
    assert rate_sequence(0, 10, 0.05)[0] == 0.0 and rate_sequence(10, 10, 0.05)[1] == 1.0
    with pytest.raises(ValueError):
        rate_sequence(11, 10, 0.05)


def test_checking_after_every_event_keeps_the_error_rate_below_alpha() -> None:
    """A fair coin watched after every fifth flip for 1,000 flips: the 95% sequence ever excludes 0.5 in at most 5%
    of 300 seeded experiments (a fixed-sample interval checked this often would in most of them)."""
    rng = random.Random(0)
    excluded = 0
    for _ in range(300):
        heads = 0
        for n in range(1, 1001):
            heads += rng.random() < 0.5
            if n % 5 == 0:
                low, high = rate_sequence(heads, n, 0.05)
                if low > 0.5 or high < 0.5:
                    excluded += 1
                    break
    assert excluded / 300 <= 0.05, excluded


def test_comparing_two_rates() -> None:
    assert compare_rates(32, 40, 10, 40, 0.05)[0] == "higher"
    assert compare_rates(10, 40, 32, 40, 0.05)[0] == "lower"
    assert compare_rates(21, 40, 19, 40, 0.05)[0] is None


def figures(version: int, **kw: float) -> VersionFigures:
    return VersionFigures(version=version, **{k: int(v) if k != "ms_per_token" else v for k, v in kw.items()})


def test_the_canary_verdicts() -> None:
    def judge(canary: VersionFigures, promoted: VersionFigures, elapsed: float = 60) -> tuple[str | None, str]:
        verdict = judge_canary(canary, promoted, elapsed, CONFIG)
        return verdict.decision, verdict.reason

    base = dict(requests=100, completions=100, ms_per_token=10.0)
    # Users like it: good rate conclusively higher.
    assert judge(figures(1, good=38, bad=2, **base), figures(0, good=10, bad=30, **base))[0] == "promote"
    # ... or they pick it in side-by-sides.
    assert judge(figures(1, wins=30, losses=2, **base), figures(0, **base))[0] == "promote"
    # Users like it less.
    decision, reason = judge(figures(1, good=5, bad=35, **base), figures(0, good=30, bad=10, **base))
    assert decision == "reject" and "good rate conclusively lower" in reason
    # One signal says better, the other worse: rejected (a loss is never outweighed).
    mixed = figures(1, good=38, bad=2, wins=2, losses=30, **base)
    assert judge(mixed, figures(0, good=10, bad=30, **base))[0] == "reject"
    # It fails more often, or is slower: rejected even if users like what it writes.
    decision, reason = judge(figures(1, good=38, bad=2, requests=100, errors=20, completions=80, ms_per_token=10.0),
                             figures(0, good=10, bad=30, **base))
    assert decision == "reject" and "error rate" in reason
    decision, reason = judge(figures(1, good=38, bad=2, requests=100, completions=100, ms_per_token=16.0),
                             figures(0, good=10, bad=30, **base))
    assert decision == "reject" and "ms per generated token" in reason
    # ... but not before both sides have --canary-min-completions.
    few = dict(requests=10, completions=10)
    assert judge(figures(1, errors=5, ms_per_token=30.0, **few), figures(0, ms_per_token=10.0, **few))[0] is None
    # No conclusion yet: go on; past the budget (time or traffic): rejected, no gain shown.
    even = (figures(1, good=20, bad=20, **base), figures(0, good=20, bad=20, **base))
    decision, reason = judge(*even)
    assert decision is None and "no conclusion yet" in reason
    assert judge(*even, elapsed=4000)[0] == "reject"
    decision, reason = judge(figures(1, good=20, bad=20, requests=1000, completions=1000, ms_per_token=10.0),
                             figures(0, good=20, bad=20, **base))
    assert decision == "reject" and "within the budget" in reason
