"""The promotion gate: the candidate and the current policy answer the same held-out prompts with the same seeds.

Honest by construction:
- the judge is not the reward model PPO optimised but one cross-fitted on feedback PPO's never saw
  (:mod:`alignd.trainer.judge`);
- the comparison is paired: both policies sample ``samples_per_prompt`` replies to each distinct held-out prompt with
  the same per-reply seeds, so they draw with the same random numbers and differ only where the policies do;
- the candidate is promoted only when the lower confidence bound of the mean paired gain (an exact sign-flip test
  over prompts, :mod:`alignd.trainer.significance`) is above the margin and its KL to the base stays within budget;
  otherwise it stays a rejected candidate, with its figures and the reason saved next to its adapter.

Replies are scored as sampled (one cut at the length cap is scored as truncated; nothing rewards or punishes length
by itself), and the gain is also reported with length regressed out, so that a candidate that only got longer or
shorter shows as such. The PPO reward model's own gain is reported beside the judge's: a large gap is PPO gaming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignd.trainer.config import GateConfig
from alignd.trainer.logprobs import token_kl
from alignd.trainer.models import ModelStack
from alignd.trainer.reward_model import RewardNormalization, score_rollouts
from alignd.trainer.rollout import Rollout, RolloutBackend, Sampling, collate_rollouts
from alignd.trainer.significance import paired_bounds

__all__ = ["DECISION_FILE", "GateDecision", "GateEvaluation", "PolicyFigures", "Scorer", "decide", "evaluate",
           "gate_seeds", "length_controlled_gain", "save_decision"]

DECISION_FILE = "gate.json"
"""The gate's decision and figures, written into the candidate's adapter folder."""


@dataclass(frozen=True)
class Scorer:
    """A reward model in the trainer's stack: its adapter role and the normalisation of its raw scores."""

    role: str
    normalization: RewardNormalization


@dataclass(frozen=True)
class PolicyFigures:
    """How one policy did on the held-out prompts."""

    mean_reward: float
    """Mean normalised score by the judge."""
    kl: float
    """Mean over replies of their summed per-token KL to the base over the vocabulary (nats); 0 for the base."""
    eos_rate: float
    """Share of replies that ended with EOS."""
    response_length: float
    """Mean reply length in tokens."""
    n: int
    """Replies scored."""


@dataclass(frozen=True)
class GateEvaluation:
    """Both policies' figures and the paired differences the decision rests on."""

    candidate: PolicyFigures
    current: PolicyFigures
    differences: list[float]
    """Per prompt: the mean over its samples of the judge's candidate score minus the current policy's."""
    length_controlled_gain: float
    """The judge's gain with reply length regressed out (see :func:`length_controlled_gain`)."""
    reward_model_gain: float | None = None
    """The same mean paired gain by PPO's own reward model (None when it is the judge)."""


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
    """The candidate's gain with reply length regressed out (see :func:`length_controlled_gain`)."""
    gain: float = float("nan")
    """Mean paired gain by the judge, over prompts."""
    gain_lower: float | None = None
    """One-sided lower confidence bound of ``gain`` at ``confidence`` (None: too few prompts to reach it)."""
    gain_upper: float | None = None
    """One-sided upper confidence bound at ``confidence``."""
    confidence: float = 0.95
    prompts: int = 0
    """Distinct prompts both policies answered (the test's sample size)."""
    heldout_prompts: int | None = None
    """How many of them were held out from PPO (the rest topped up from PPO's own while few are held out)."""
    samples_per_prompt: int = 1
    judge: str = "reward model"
    """What scored the replies: ``cross-fitted judge``, or ``reward model`` (PPO's own: not independent)."""
    reward_model_gain: float | None = None
    """The mean paired gain by PPO's reward model, for contrast with the judge's."""
    implicit_reward: dict[str, Any] = field(default_factory=dict)
    """The implicit-reward check on held-out user pairs (:mod:`alignd.trainer.implicit_reward`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_seeds(n: int, seed: int) -> list[int]:
    """``n`` per-reply sampling seeds for a run seeded ``seed`` (vLLM takes 32-bit seeds)."""
    return [(seed * 1_000_003 + i) % 2**31 for i in range(n)]


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
    scores: Tensor  # (B,) normalised judge score
    reward_model_scores: Tensor | None  # (B,) normalised score by PPO's reward model
    lengths: Tensor  # (B,) reply tokens


def _evaluate_policy(
    stack: ModelStack,
    backend: RolloutBackend,
    prompts: Sequence[list[int]],
    seeds: Sequence[int],
    adapter: str | None,
    judge: Scorer,
    reward_model: Scorer | None,
    config: GateConfig,
) -> _Samples:
    """Sample one reply per (prompt, seed) from ``adapter`` (None: the base), score it and measure its KL."""
    rollouts = backend.generate(stack, prompts, adapter, Sampling(config.temperature, config.max_new_tokens), seeds)
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    ended = torch.tensor([r.ended for r in rollouts], device=stack.device)  # (B,)
    scores = score_rollouts(stack, sequences, attention_mask, judge.normalization, role=judge.role)  # (B,)
    rm_scores = None if reward_model is None else score_rollouts(
        stack, sequences, attention_mask, reward_model.normalization, role=reward_model.role).cpu()  # (B,)
    lengths = action_mask.sum(-1).float()  # (B,)
    kl = _sequence_kl(stack, rollouts, adapter, config.temperature) if adapter is not None else torch.zeros(1)
    figures = PolicyFigures(
        mean_reward=scores.mean().item(),
        kl=kl.mean().item(),
        eos_rate=ended.float().mean().item(),
        response_length=lengths.mean().item(),
        n=len(rollouts),
    )
    return _Samples(figures, scores.cpu(), rm_scores, lengths.cpu())


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
    judge: Scorer,
    config: GateConfig,
    seed: int = 0,
    reward_model: Scorer | None = None,
) -> GateEvaluation:
    """The candidate adapter and the current policy (an adapter, or None for the base) each answer every prompt
    ``config.samples_per_prompt`` times with the same seeds; ``judge`` scores them (and ``reward_model``, PPO's
    own, for contrast). The prompts should be distinct: the prompt is the unit of the paired test."""
    k = config.samples_per_prompt
    repeated = [p for p in prompts for _ in range(k)]  # (n·k,) each prompt's samples together
    seeds = gate_seeds(len(repeated), seed)
    ours = _evaluate_policy(stack, backend, repeated, seeds, candidate, judge, reward_model, config)
    theirs = _evaluate_policy(stack, backend, repeated, seeds, current, judge, reward_model, config)
    differences = (ours.scores - theirs.scores).view(len(prompts), k).mean(1)  # (n,)
    rm_gain = None
    if ours.reward_model_scores is not None and theirs.reward_model_scores is not None:
        rm_gain = (ours.reward_model_scores - theirs.reward_model_scores).mean().item()
    return GateEvaluation(
        candidate=ours.figures, current=theirs.figures, differences=differences.tolist(),
        length_controlled_gain=length_controlled_gain(ours.scores, ours.lengths, theirs.scores, theirs.lengths),
        reward_model_gain=rm_gain)


def decide(evaluation: GateEvaluation, config: GateConfig, judge: str = "reward model",
           implicit_reward: dict[str, Any] | None = None, seed: int = 0, heldout_prompts: int | None = None
           ) -> GateDecision:
    """Promote only if the lower confidence bound of the mean paired gain is above ``config.margin`` and the
    candidate's KL to the base is within ``config.kl_budget``."""
    d = evaluation.differences
    gain = sum(d) / len(d) if d else float("nan")
    lower, upper = paired_bounds(d, config.confidence, seed=seed)
    failures = []
    level = f"{config.confidence:.0%}"
    if lower is None:
        failures.append(f"{len(d)} prompts are too few to bound the gain at {level} confidence")
    elif lower <= config.margin:
        failures.append(f"paired gain {gain:+.3f}: its {level} lower bound {lower:+.3f} is not above the margin "
                        f"{config.margin:.3f}")
    if evaluation.candidate.kl > config.kl_budget:
        failures.append(f"KL to the base {evaluation.candidate.kl:.3f} exceeds the budget {config.kl_budget:.3f}")
    reason = "; ".join(failures) or (
        f"paired gain {gain:+.3f}, {level} lower bound {lower:+.3f} > margin {config.margin:.3f}, and KL "
        f"{evaluation.candidate.kl:.3f} ≤ budget {config.kl_budget:.3f}")
    return GateDecision(
        promote=not failures, reason=reason, candidate=evaluation.candidate, current=evaluation.current,
        margin=config.margin, kl_budget=config.kl_budget, length_controlled_gain=evaluation.length_controlled_gain,
        gain=gain, gain_lower=lower, gain_upper=upper, confidence=config.confidence, prompts=len(d),
        heldout_prompts=heldout_prompts,
        samples_per_prompt=config.samples_per_prompt, judge=judge, reward_model_gain=evaluation.reward_model_gain,
        implicit_reward=implicit_reward or {})


def save_decision(folder: str | Path, decision: GateDecision) -> Path:
    """Write the decision and its figures into the candidate's adapter folder; returns the file."""
    path = Path(folder) / DECISION_FILE
    path.write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    return path
