"""Confidence bounds on a paired gain, by an exact paired test that assumes no normality.

The gate compares two policies on the same prompts with the same seeds, so each prompt gives one paired difference
``d_i`` (the mean over its samples of candidate score − current score). The test of "the mean gain is μ" flips the
signs of ``d_i − μ`` at random (the sign-flip or randomisation test): it is exact whenever the differences are
symmetric about their mean, which holds by construction when the two policies are exchangeable (a candidate no
better than the current policy), the case the gate must reject. Inverting it gives the bounds: the test at μ rejects
exactly when μ lies below a given quantile of the means of random subsets of the ``d_i`` (Hartigan's typical values),
so the lower confidence bound is that quantile, computed without a search. With twelve prompts or fewer every subset
is enumerated; beyond, ``resamples`` random subsets from a seeded generator make the bound reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["paired_bounds"]

_ENUMERATE_UP_TO = 12
"""Prompts up to which every non-empty subset (at most 4095) is enumerated instead of sampled."""


def _subset_means(differences: Tensor, resamples: int, seed: int) -> Tensor:
    """Means of the non-empty subsets of ``differences`` (all of them, or ``resamples`` random ones), (M,)."""
    n = differences.shape[0]
    if n <= _ENUMERATE_UP_TO:
        codes = torch.arange(1, 2**n, dtype=torch.long)  # (M,) every non-empty subset as a bit mask
        members = ((codes.unsqueeze(1) >> torch.arange(n)) & 1).to(differences.dtype)  # (M, n)
    else:
        generator = torch.Generator().manual_seed(seed)
        members = torch.randint(0, 2, (resamples, n), generator=generator).to(differences.dtype)  # (M, n)
        members = members[members.sum(1) > 0]  # an empty subset has no mean (probability 2^-n)
    return (members @ differences) / members.sum(1)  # (M,)


def paired_bounds(differences: Sequence[float] | Tensor, confidence: float, resamples: int = 4000, seed: int = 0
                  ) -> tuple[float | None, float | None]:
    """``(lower, upper)``: one-sided confidence bounds at ``confidence`` on the mean of paired ``differences`` (so
    together an interval at ``2 * confidence - 1``). None where the prompts are too few to reach that confidence at
    all (fewer than log2(1 / (1 - confidence)) of them): the gate then cannot conclude anything.

    The lower bound is above μ with probability at most ``1 - confidence`` when the differences are symmetric about
    μ, for any sample size and any distribution of that shape (see the module docstring).
    """
    d = torch.as_tensor(differences, dtype=torch.float64).flatten()  # (n,)
    if d.numel() == 0:
        return None, None
    means, _ = _subset_means(d, resamples, seed).sort()  # (M,)
    # Under the null the observed signs are one of M + 1 equally likely patterns, and the pattern flipping subset S
    # is at least as extreme as the observed one exactly when μ ≥ mean(S). The test at μ rejects at level α when
    # 1 + #{S: mean(S) ≤ μ} ≤ α(M + 1), i.e. for every μ below the k-th smallest subset mean, k = ⌊α(M + 1)⌋.
    k = math.floor((1.0 - confidence) * (means.numel() + 1) + 1e-9)
    if k < 1:
        return None, None
    return means[k - 1].item(), means[-k].item()
