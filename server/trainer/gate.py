"""The promotion gate: the candidate and the current policy answer the same held-out prompts.

The candidate is promoted only if its mean reward beats the current policy's by the configured margin and its KL to
the base stays within budget; otherwise it stays a rejected candidate, with its figures and the reason saved next to
its adapter. Replies are scored as sampled (one cut at the length cap is scored as truncated; nothing rewards or
punishes length by itself), and the gain is also reported with length regressed out, so that a candidate that only
got longer or shorter shows as such.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignd.trainer.config import GateConfig
from alignd.trainer.logprobs import token_kl
from alignd.trainer.models import ModelStack
from alignd.trainer.reward_model import RewardNormalization, score_rollouts
from alignd.trainer.rollout import Rollout, RolloutBackend, Sampling, collate_rollouts

__all__ = ["DECISION_FILE", "GateDecision", "PolicyFigures", "decide", "evaluate", "evaluate_policy",
           "length_controlled_gain", "save_decision"]

DECISION_FILE = "gate.json"
"""The gate's decision and figures, written into the candidate's adapter folder."""


@dataclass(frozen=True)
class PolicyFigures:
    """How one policy did on the held-out prompts."""

    mean_reward: float
    """Mean normalised reward-model score: what the gate compares."""
    kl: float
    """Mean over replies of their summed per-token KL to the base over the vocabulary (nats); 0 for the base."""
    eos_rate: float
    """Share of replies that ended with EOS."""
    response_length: float
    """Mean reply length in tokens."""
    n: int
    """Replies scored."""


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote the candidate, why, and the figures behind it."""

    promote: bool
    reason: str
    candidate: PolicyFigures
    current: PolicyFigures
    margin: float
    kl_budget: float
    length_controlled_gain: float
    """The candidate's reward gain with reply length regressed out (see :func:`length_controlled_gain`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _sequence_kl(stack: ModelStack, rollouts: Sequence[Rollout], adapter: str, temperature: float) -> Tensor:
    """Each reply's KL to the base summed over its positions, (B,): the full-vocabulary per-token KL PPO reports
    and steers by (:func:`alignd.trainer.logprobs.token_kl`)."""
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    response_len, chunk, parts = action_mask.shape[1], 16, []
    for start in range(0, len(rollouts), chunk):
        rows = slice(start, start + chunk)
        with stack.use(adapter):
            logits = stack.response_logits(sequences[rows], attention_mask[rows], response_len)  # (b, R, V)
        with stack.use(None):
            ref_logits = stack.response_logits(sequences[rows], attention_mask[rows], response_len)  # (b, R, V)
        parts.append((token_kl(logits, ref_logits, temperature) * action_mask[rows]).sum(-1))  # (b,)
    return torch.cat(parts)  # (B,)


@dataclass(frozen=True)
class _Samples:
    """One policy's scored replies."""

    figures: PolicyFigures
    scores: Tensor  # (B,) normalised reward-model score
    lengths: Tensor  # (B,) reply tokens


def evaluate_policy(
    stack: ModelStack,
    backend: RolloutBackend,
    prompts: Sequence[list[int]],
    adapter: str | None,
    normalization: RewardNormalization,
    config: GateConfig,
) -> _Samples:
    """Sample one reply per prompt from ``adapter`` (None: the base), score it and measure its KL to the base."""
    rollouts = backend.generate(stack, prompts, adapter, Sampling(config.temperature, config.max_new_tokens))
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    ended = torch.tensor([r.ended for r in rollouts], device=stack.device)  # (B,)
    scores = score_rollouts(stack, sequences, attention_mask, normalization)  # (B,)
    lengths = action_mask.sum(-1).float()  # (B,)
    kl = _sequence_kl(stack, rollouts, adapter, config.temperature) if adapter is not None else torch.zeros(1)
    figures = PolicyFigures(
        mean_reward=scores.mean().item(),
        kl=kl.mean().item(),
        eos_rate=ended.float().mean().item(),
        response_length=lengths.mean().item(),
        n=len(rollouts),
    )
    return _Samples(figures, scores.cpu(), lengths.cpu())


def length_controlled_gain(candidate_scores: Tensor, candidate_lengths: Tensor, current_scores: Tensor,
                           current_lengths: Tensor) -> float:
    """The candidate's coefficient in ``score ~ 1 + length + is_candidate`` over both policies' replies (least
    squares): its reward gain at equal reply length. Equal to the plain gain when lengths do not differ."""
    scores = torch.cat([candidate_scores, current_scores]).double()  # (2B,)
    lengths = torch.cat([candidate_lengths, current_lengths]).double()  # (2B,)
    is_candidate = torch.cat([torch.ones_like(candidate_scores), torch.zeros_like(current_scores)]).double()
    if lengths.std() < 1e-9:  # no length to regress out: the plain difference of means
        return (candidate_scores.double().mean() - current_scores.double().mean()).item()
    design = torch.stack([torch.ones_like(scores), lengths - lengths.mean(), is_candidate], dim=1)  # (2B, 3)
    coefficients = torch.linalg.lstsq(design, scores.unsqueeze(1)).solution.squeeze(1)  # (3,)
    return coefficients[2].item()


def evaluate(
    stack: ModelStack,
    backend: RolloutBackend,
    prompts: Sequence[list[int]],
    candidate: str,
    current: str | None,
    normalization: RewardNormalization,
    config: GateConfig,
) -> tuple[PolicyFigures, PolicyFigures, float]:
    """Figures of the candidate adapter and of the current policy (an adapter, or None for the base), and the
    candidate's length-controlled gain."""
    ours = evaluate_policy(stack, backend, prompts, candidate, normalization, config)
    theirs = evaluate_policy(stack, backend, prompts, current, normalization, config)
    gain = length_controlled_gain(ours.scores, ours.lengths, theirs.scores, theirs.lengths)
    return ours.figures, theirs.figures, gain


def decide(candidate: PolicyFigures, current: PolicyFigures, margin: float, kl_budget: float,
           length_controlled: float = float("nan")) -> GateDecision:
    """Promote only if the candidate gains at least ``margin`` in mean reward and its KL is within ``kl_budget``."""
    gain = candidate.mean_reward - current.mean_reward
    failures = []
    if gain < margin:
        failures.append(f"mean reward gain {gain:+.3f} is below the margin {margin:.3f}")
    if candidate.kl > kl_budget:
        failures.append(f"KL to the base {candidate.kl:.3f} exceeds the budget {kl_budget:.3f}")
    reason = "; ".join(failures) or (
        f"mean reward gain {gain:+.3f} ≥ margin {margin:.3f} and KL {candidate.kl:.3f} ≤ budget {kl_budget:.3f}"
    )
    return GateDecision(promote=not failures, reason=reason, candidate=candidate, current=current, margin=margin,
                        kl_budget=kl_budget, length_controlled_gain=length_controlled)


def save_decision(folder: str | Path, decision: GateDecision) -> Path:
    """Write the decision and its figures into the candidate's adapter folder; returns the file."""
    path = Path(folder) / DECISION_FILE
    path.write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    return path
