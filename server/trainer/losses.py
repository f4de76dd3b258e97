"""Small pure functions of RLHF: masked statistics, GAE, the PPO and reward-model losses, the KL controller.

Shapes: ``B`` sequences, ``T`` response tokens. Masks are 1 on real response tokens and 0 on padding; every
statistic ignores masked-out positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "PolicyLossStats",
    "compute_gae",
    "explained_variance",
    "label_loss",
    "masked_mean",
    "masked_var",
    "policy_loss",
    "reward_loss",
    "value_loss",
    "whiten",
]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of the masked-in entries of ``x``."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    sum_sq = masked_mean((x - mean) ** 2, mask) * n
    return sum_sq / (n - 1).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Scale ``x`` to unit variance (and zero mean, unless ``shift_mean`` is False) over the mask; padding -> 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_gae(
    rewards: Tensor,  # (B, T) per-token rewards
    values: Tensor,  # (B, T) critic values V(s_t)
    mask: Tensor,  # (B, T) 1 on response tokens; a right-padded prefix per row
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns ``(advantages, returns)``, both (B, T), 0 on padding.

    The episode ends after each row's last masked-in token, so the value after it counts as 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # padding contributes nothing, and V after the end is 0
    advantages = torch.zeros_like(values)  # (B, T)
    last_gae = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last_gae)  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of one policy-loss evaluation (detached scalars)."""

    approx_kl: float
    """``E[(r - 1) - log r]`` with ``r = π / π_old``: how far this update moved the policy (k3 estimator)."""
    clip_fraction: float
    """Share of tokens whose ratio was clipped."""


def policy_loss(
    logprobs: Tensor,  # (B, T) log π(a_t) under the policy being updated
    old_logprobs: Tensor,  # (B, T) log π_old(a_t) from the rollout
    advantages: Tensor,  # (B, T)
    mask: Tensor,  # (B, T)
    clip_eps: float,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO's clipped surrogate objective, as a loss (mean over masked-in tokens)."""
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = PolicyLossStats(
            approx_kl=masked_mean((ratio - 1) - log_ratio, mask).item(),
            clip_fraction=masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
        )
    return loss, stats


def value_loss(
    values: Tensor,  # (B, T) current critic values
    old_values: Tensor,  # (B, T) values at rollout time
    returns: Tensor,  # (B, T) GAE returns
    mask: Tensor,  # (B, T)
    clip: float,
) -> Tensor:
    """Clipped value loss: ``0.5 * max((V - R)², (V_clipped - R)²)``, mean over masked-in tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def reward_loss(
    r_chosen: Tensor,  # (N,) reward of each pair's chosen reply
    r_rejected: Tensor,  # (N,) reward of each pair's rejected reply
    margin: Tensor,  # (N,) required reward gap (0 for none)
    weight: Tensor,  # (N,) pair weight (1/C(K,2) for the pairs of a K-way ranking)
    mean_weight: float | None = None,
) -> Tensor:
    """Bradley–Terry loss ``-log σ(r_chosen - r_rejected - margin)``, weighted mean over pairs: divided by this
    batch's weight sum, or with ``mean_weight`` (the mean over all the training pairs) by ``mean_weight × N``, so
    that a batch of light pairs (a capped user's) weighs as little as its pairs do in the whole set."""
    losses = -F.logsigmoid(r_chosen - r_rejected - margin)  # (N,)
    return (weight * losses).sum() / _denominator(weight, mean_weight)


def _denominator(weight: Tensor, mean_weight: float | None) -> Tensor | float:
    return weight.sum().clamp(min=1e-12) if mean_weight is None else max(mean_weight, 1e-12) * len(weight)


def label_loss(
    r: Tensor,  # (N,) reward of each labelled reply
    label: Tensor,  # (N,) 1.0 for good, 0.0 for bad
    weight: Tensor,  # (N,)
    mean_weight: float | None = None,
) -> Tensor:
    """Binary cross-entropy of ``σ(r)`` against good/bad labels, weighted mean (as in :func:`reward_loss`)."""
    losses = F.binary_cross_entropy_with_logits(r, label.to(r.dtype), reduction="none")  # (N,)
    return (weight * losses).sum() / _denominator(weight, mean_weight)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var[returns - values] / Var[returns]`` over the mask: 1 is a perfect critic, ≤ 0 a useless one."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


class KLController(Protocol):
    """Holds the KL coefficient β and updates it after each iteration."""

    value: float

    def update(self, current_kl: float) -> None: ...


class AdaptiveKLController:
    """A controller that holds KL near its target within a run.

    ``β ← clamp(β · exp(clip(gain · (ln(KL / target) + ln(KL / KL_previous)), ±2)), 1e-4, 10)``: β moves in log
    space by how far KL is from the target in log space, plus KL's last growth (where it is heading: once PPO's drift
    takes off, KL grows by a factor per iteration, and a β that answers only where KL *was* arrives an iteration
    late, with KL several times the target). Until KL first comes within half of the target, β does not fall: early
    iterations always show KL near zero, and a β that collapsed while the policy had not moved could not hold KL when
    it takes off. Ziegler et al.'s controller moved β by at most ``0.2 · n / horizon`` per batch (2.5% with 32
    samples and a horizon of 256): on SmolLM2, KL went to five times its target while β stayed put.
    """

    MIN, MAX = 1e-4, 10.0
    MAX_STEP = 2.0
    """Largest change of ln β in one iteration."""

    def __init__(self, init_kl_coef: float, target: float, gain: float, engaged: bool = False) -> None:
        self.value = init_kl_coef
        self.target = target
        self.gain = gain
        self.previous: float | None = None
        self.engaged = engaged
        """Whether β may fall: from the first KL near the target on, or from the start for a β carried over from an
        earlier run (one left high there must be able to come down when this run's KL stays low)."""

    def update(self, current_kl: float) -> None:
        """Adjust β after an iteration whose mean sequence KL was ``current_kl``: on where KL is heading (its last
        growth continued one more iteration), since PPO's drift makes KL grow by a factor per iteration once it
        takes off and a β that reacts to where KL *was* arrives an iteration late, with KL several times the target."""
        kl = max(current_kl, 1e-3)
        # The trend only once KL is measurable: near zero, its estimate is noise and ratios of noise are large.
        floor = self.target / 10
        measurable = self.previous is not None and self.previous >= floor and kl >= floor
        trend = math.log(kl / self.previous) if measurable else 0.0  # type: ignore[operator]
        self.previous = kl
        self.engaged = self.engaged or kl >= self.target / 2
        error = math.log(kl / self.target) + (trend if self.engaged else max(trend, 0.0))
        # Until KL first comes near the target (the policy has not moved yet), β does not fall: one that collapsed
        # while nothing happened could not hold KL when it takes off.
        step = min(max(self.gain * error, -self.MAX_STEP if self.engaged else 0.0), self.MAX_STEP)
        self.value = min(max(self.value * math.exp(step), self.MIN), self.MAX)


class FixedKLController:
    """A constant β (what ``target_kl=None`` selects)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float) -> None:
        """Keep β."""
