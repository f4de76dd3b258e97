"""What the preference objectives (online DPO, KTO) share: the users' judged replies as token sequences, whole
replies' summed log-probabilities under the policy and the reference, weighted draws of feedback, and the
measurement of sampled replies (reward, KL to the base, entropy) that every objective reports as PPO does."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from alignd.store import Label
from alignd.trainer.config import TrainerConfig
from alignd.trainer.distributed import agreed
from alignd.trainer.losses import masked_mean
from alignd.trainer.models import POLICY, ModelStack
from alignd.trainer.ppo import forward_passes
from alignd.trainer.reward_model import PairGroup, RewardNormalization, score_rollouts
from alignd.trainer.rollout import Rollout, collate_rollouts, encode_prompt, policy_logprobs

__all__ = [
    "DPO_TEMPERATURE",
    "SampledReplies",
    "UserFeedback",
    "keep_within_budget",
    "measure_replies",
    "reply_rollout",
    "sequence_logprobs",
    "summed_logprobs",
    "weighted_draw",
]

T = TypeVar("T")

DPO_TEMPERATURE = 1.0
"""The preference objectives' log-probs are the model's own (logits at T = 1): DPO's and KTO's implicit reward is
defined against the policy as it is, not as it is sampled."""


@dataclass
class UserFeedback:
    """The users' judgements a run's preference objective trains on (the reward model's side of the judge split)."""

    pairs: Sequence[PairGroup] = ()
    """Preference pairs, grouped by feedback event (online DPO)."""
    labels: Sequence[Label] = ()
    """Good/bad labels from thumbs, clear ratings and "both bad" comparisons (KTO)."""
    truncated: Collection[str] = field(default_factory=set)
    """Reply texts cut at their length limit when served (no end-of-turn token, as the reward model sees them)."""


def reply_rollout(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[dict[str, Any]], reply: str,
                  max_prompt_tokens: int, max_reply_tokens: int, truncated: Collection[str] = ()) -> Rollout:
    """A user's judged reply as the policy would have produced it: the templated prompt's tail, the reply's tokens,
    and the end-of-turn token unless the reply was cut (when served, or here at ``max_reply_tokens``), as the reward
    model encodes it."""
    reply_ids = list(tokenizer.encode(reply, add_special_tokens=False))
    finished = reply not in truncated and len(reply_ids) <= max_reply_tokens
    response = reply_ids[:max_reply_tokens] + ([tokenizer.eos_token_id] if finished else [])
    return Rollout(prompt_ids=encode_prompt(tokenizer, prompt, max_prompt_tokens), response_ids=response,
                   ended=finished)


def weighted_draw(items: Sequence[T], weights: Sequence[float], n: int, rng: random.Random) -> list[T]:
    """``n`` items drawn with replacement in proportion to ``weights``: in expectation the weighted loss (ranking
    pairs at 1/C(K,2), recency, the per-user cap) with every drawn item weighing 1 in its batch."""
    if not items or n <= 0:
        return []
    return rng.choices(list(items), weights=[max(w, 0.0) for w in weights], k=n) if sum(weights) > 0 else \
        rng.choices(list(items), k=n)


def summed_logprobs(
    logprobs: Tensor,  # (B, R) per reply token
    mask: Tensor,  # (B, R) 1 on reply tokens
) -> Tensor:
    """``log π(y|x)`` of each whole reply, (B,): the per-token log-probs summed over the reply (padding left out)."""
    return (logprobs * mask).sum(-1)


@torch.no_grad()
def sequence_logprobs(stack: ModelStack, sequences: Tensor, attention_mask: Tensor, response_len: int,
                      adapter: str | None, chunk: int) -> Tensor:
    """Per-token log-probs of the reply tokens under ``adapter`` (None: the reference, the base with adapters off),
    (B, R), at :data:`DPO_TEMPERATURE`, in chunks of ``chunk`` sequences, without gradient."""
    parts = []
    with stack.use(adapter):
        for start in range(0, sequences.shape[0], chunk):
            rows = slice(start, start + chunk)
            parts.append(policy_logprobs(stack, sequences[rows], attention_mask[rows], response_len,
                                         DPO_TEMPERATURE))
    return torch.cat(parts)  # (B, R)


@dataclass
class SampledReplies:
    """Replies the current policy sampled, measured as PPO measures its rollouts; B replies, R reply positions."""

    sequences: Tensor  # (B, P + R)
    attention_mask: Tensor  # (B, P + R)
    action_mask: Tensor  # (B, R)
    scores: Tensor  # (B,) normalised reward-model score
    full_kl: Tensor  # (B, R) KL(π || π_ref) over the vocabulary at each position (0 on padding)
    entropy: Tensor  # (B, R)
    ended: Tensor  # (B,) bool

    @property
    def kl(self) -> float:
        """Mean over replies of the summed per-token KL: PPO's ``kl`` figure (and the budget's measure)."""
        return self.full_kl.sum(-1).mean().item()

    def figures(self, rollout_seconds: float) -> dict[str, float]:
        """The per-iteration figures every objective reports (``IterationStats``' reward, kl, entropy, …)."""
        lengths = self.action_mask.sum(-1).float()  # (B,)
        return {"reward": self.scores.mean().item(), "kl": self.kl,
                "entropy": masked_mean(self.entropy, self.action_mask).item(),
                "eos_rate": self.ended.float().mean().item(), "response_length": lengths.mean().item(),
                "tokens_per_s": lengths.sum().item() / max(rollout_seconds, 1e-9)}


def measure_replies(stack: ModelStack, rollouts: Sequence[Rollout], normalization: RewardNormalization,
                    config: TrainerConfig) -> SampledReplies:
    """Score the sampled replies with the reward model and measure their KL to the base and entropy (PPO's passes,
    at the sampling temperature)."""
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    _, entropy, _, full_kl = forward_passes(stack, sequences, attention_mask, action_mask.shape[1], config.ppo)
    scores = score_rollouts(stack, sequences, attention_mask, normalization, config.ppo.forward_batch_size)
    return SampledReplies(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                          scores=scores, full_kl=full_kl * action_mask, entropy=entropy,
                          ended=torch.tensor([r.ended for r in rollouts], device=stack.device))


def keep_within_budget(stack: ModelStack, kl: float, budget: float, in_budget: dict[str, Tensor] | None,
                       iteration: int) -> str | None:
    """As PPO does: when the sampled replies' KL passed the gate's budget, put back the last policy whose replies
    were within it and say why the phase stops; None when within the budget (rank 0's decision, on every rank)."""
    if not agreed(kl > budget):
        return None
    if in_budget is not None:
        stack.load_adapter_state(POLICY, in_budget)
    return (f"KL {kl:.2f} passed the budget {budget:.2f} at iteration {iteration}; "
            f"kept the policy of iteration {iteration - 1 if in_budget is not None else iteration}")
