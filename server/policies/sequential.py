"""Always-valid confidence sequences for rates, so that a live experiment may be checked after every event.

A canary's figures are looked at continuously and the experiment stops the moment they are conclusive; a fixed-
sample test checked that way is wrong far more often than its level. The interval here holds at every sample size
at once: for a rate p, the mixture of Bernoulli likelihood ratios over a uniform prior,

    M_n(p) = B(s + 1, f + 1) / (p^s (1 - p)^f)      (s successes, f failures),

is a nonnegative martingale with mean 1 under p (Robbins' mixture), so by Ville's inequality it ever exceeds 1/α with
probability at most α. The confidence sequence is the set of p where it has not: {p : M_n(p) < 1/α}, an interval
around s/n, found by bisection. Pure Python: the serving process does not import torch.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["Comparison", "compare_rates", "rate_sequence"]

Comparison = Literal["higher", "lower"] | None
"""How a rate compares with another once the evidence is conclusive; None while it is not."""


def _log_mixture_ratio(p: float, successes: int, failures: int) -> float:
    """log M_n(p)."""
    log_beta = math.lgamma(successes + 1) + math.lgamma(failures + 1) - math.lgamma(successes + failures + 2)
    at_p = (successes * math.log(p) if successes else 0.0) + (failures * math.log1p(-p) if failures else 0.0)
    return log_beta - at_p


def rate_sequence(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """``(low, high)``: the confidence sequence at level ``1 - alpha`` for a rate after ``successes`` of ``trials``;
    (0, 1) with no trials. It covers the true rate at every ``trials`` simultaneously with probability ≥ 1 - α."""
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes of {trials} trials")
    failures, threshold = trials - successes, math.log(1 / alpha)
    centre = successes / trials if trials else 0.5

    def inside(p: float) -> bool:
        return _log_mixture_ratio(p, successes, failures) < threshold

    def edge(outside: float, within: float) -> float:  # bisection between a rejected and an accepted rate
        for _ in range(60):
            middle = (outside + within) / 2
            outside, within = (outside, middle) if inside(middle) else (middle, within)
        return within

    eps = 1e-12
    low = 0.0 if successes == 0 or inside(eps) else edge(eps, min(max(centre, eps), 1 - eps))
    high = 1.0 if failures == 0 or inside(1 - eps) else edge(1 - eps, min(max(centre, eps), 1 - eps))
    return low, high


def compare_rates(successes: int, trials: int, other_successes: int, other_trials: int, alpha: float
                  ) -> tuple[Comparison, tuple[float, float], tuple[float, float]]:
    """Whether the first rate is conclusively higher or lower than the second: their confidence sequences, each at
    ``alpha / 2`` (so that together they fail at most α of the time), no longer overlap. Returns the verdict and both
    sequences."""
    ours = rate_sequence(successes, trials, alpha / 2)
    theirs = rate_sequence(other_successes, other_trials, alpha / 2)
    verdict: Comparison = "higher" if ours[0] > theirs[1] else "lower" if ours[1] < theirs[0] else None
    return verdict, ours, theirs
