"""Critic-free policy gradients on the policy adapter: GRPO and RLOO.

Per iteration: sample ``rollout_batch_size / k`` prompts, have the current policy answer each ``k`` times (in the
serving engine), score every reply with the reward model, and give each reply an advantage from its group of ``k``:
the group's other replies are the baseline, so no critic is needed. Then epochs × minibatches of PPO's clipped
ratio loss, with that one advantage on every token of the reply.

- **GRPO** (Shao et al., DeepSeekMath 2024): advantage ``(r - mean) / std`` within the group; the KL to the base is a
  *loss term*, ``β · k3`` per token. Not a reward penalty, because dividing by the group's std would rescale the
  penalty by a different factor in every group: β would mean something else per prompt.
- **RLOO** (Ahmadian et al., "Back to Basics" 2024): the reward is the score minus ``β · Σ_t (log π - log π_ref)``
  (PPO's per-token penalty, summed over the reply: β means what PPO's does), and the advantage is that reward minus
  the mean of the group's *other* replies' (leave-one-out: unbiased). The update uses the same ratio clipping as
  GRPO and PPO rather than plain REINFORCE: with several epochs over one batch the later steps are off-policy, and the
  clip keeps them from moving the policy far on one batch.

Both steer β towards the KL target with PPO's adaptive controller, report iterations in PPO's shape (no critic:
its figures are None), and stop, like PPO, when an iteration's KL passes the gate's budget.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from alignd.trainer.config import CriticFreeConfig, PPOConfig, TrainerConfig
from alignd.trainer.distributed import agreed, all_reduce_grads, same_start, shard
from alignd.trainer.losses import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    PolicyLossStats,
    masked_mean,
    policy_loss,
)
from alignd.trainer.models import POLICY, ModelStack
from alignd.trainer.ppo import IterationStats, PPOResult, forward_passes, sample_prompts
from alignd.trainer.reward_model import RewardNormalization, score_rollouts
from alignd.trainer.rollout import Rollout, RolloutBackend, Sampling, collate_rollouts, policy_logprobs

__all__ = [
    "CRITIC_FREE",
    "CriticFreeStats",
    "GroupExperience",
    "critic_free_loss",
    "group_prompts",
    "grpo_advantages",
    "k3_kl",
    "kl_penalized_scores",
    "make_group_experience",
    "rloo_advantages",
    "run_critic_free",
]

log = logging.getLogger(__name__)


# --- advantages and losses (pure) -----------------------------------------------------------------------------


def grpo_advantages(
    rewards: Tensor,  # (B,) B = G groups × k replies, each group's replies adjacent
    k: int,
    eps: float = 1e-4,
) -> Tensor:
    """GRPO: ``(r - mean) / (std + eps)`` within each group of ``k`` (unbiased std); (B,). A group whose replies
    scored alike gets 0: it says nothing about which reply was better."""
    groups = rewards.view(-1, k)  # (G, k)
    mean = groups.mean(-1, keepdim=True)  # (G, 1)
    std = groups.std(-1, keepdim=True)  # (G, 1)
    return ((groups - mean) / (std + eps)).reshape(-1)  # (B,)


def rloo_advantages(
    rewards: Tensor,  # (B,) B = G groups × k replies, each group's replies adjacent
    k: int,
) -> Tensor:
    """RLOO: each reward minus the mean of the other ``k - 1`` of its group; (B,)."""
    groups = rewards.view(-1, k)  # (G, k)
    others = (groups.sum(-1, keepdim=True) - groups) / (k - 1)  # (G, k) leave-one-out mean
    return (groups - others).reshape(-1)  # (B,)


def kl_penalized_scores(
    scores: Tensor,  # (B,) reward-model score per reply
    logprobs: Tensor,  # (B, R) policy at rollout time
    ref_logprobs: Tensor,  # (B, R) reference
    mask: Tensor,  # (B, R)
    kl_coef: float,
) -> Tensor:
    """RLOO's reward, (B,): the score minus ``β · Σ_t (log π - log π_ref)`` over the reply's tokens (the sum of PPO's
    per-token penalties)."""
    return scores - kl_coef * ((logprobs - ref_logprobs) * mask).sum(-1)


def k3_kl(
    logprobs: Tensor,  # (B, R) log π(a_t), with gradient
    ref_logprobs: Tensor,  # (B, R) log π_ref(a_t)
) -> Tensor:
    """Per-token estimate of KL(π || π_ref) from the sampled tokens, (B, R): ``exp(d) - d - 1`` with
    ``d = log π_ref - log π`` (Schulman's k3: never negative, unbiased; GRPO's KL term)."""
    d = ref_logprobs - logprobs  # (B, R)
    return torch.exp(d) - d - 1


def critic_free_loss(
    logprobs: Tensor,  # (B, R) log π(a_t) under the policy being updated
    old_logprobs: Tensor,  # (B, R) at rollout time
    ref_logprobs: Tensor,  # (B, R) reference
    advantages: Tensor,  # (B,) one per reply
    mask: Tensor,  # (B, R)
    clip_eps: float,
    kl_coef: float,
) -> tuple[Tensor, Tensor, PolicyLossStats]:
    """``(loss, kl_term, stats)``: PPO's clipped ratio loss with each reply's advantage on all its tokens, plus
    ``kl_coef`` × the mean k3 KL per token (0 for RLOO, whose KL is in the reward). Means are over the masked-in
    tokens of the batch (not per reply first: a long reply's tokens weigh as much as a short one's)."""
    per_token = advantages[:, None] * mask  # (B, R)
    pg_loss, stats = policy_loss(logprobs, old_logprobs, per_token, mask, clip_eps)
    kl_term = masked_mean(k3_kl(logprobs, ref_logprobs), mask)
    return pg_loss + kl_coef * kl_term, kl_term.detach(), stats


@dataclass(frozen=True)
class CriticFree:
    """What tells GRPO and RLOO apart."""

    name: str
    advantages: Callable[[Tensor, CriticFreeConfig], Tensor]
    """(B,) rewards → (B,) advantages, groups of ``samples_per_prompt`` adjacent."""
    kl_in_loss: bool
    """KL as a loss term (GRPO) or subtracted from the reward (RLOO)."""


CRITIC_FREE: dict[str, CriticFree] = {
    "grpo": CriticFree("grpo", lambda r, c: grpo_advantages(r, c.samples_per_prompt, c.std_eps), kl_in_loss=True),
    "rloo": CriticFree("rloo", lambda r, c: rloo_advantages(r, c.samples_per_prompt), kl_in_loss=False),
}


# --- experience -----------------------------------------------------------------------------------------------


def group_prompts(prompts: Sequence[list[int]], groups: int, k: int, rng: random.Random) -> list[list[int]]:
    """``groups`` prompts, each repeated ``k`` times in a row (a group's replies stay adjacent)."""
    return [prompt for prompt in sample_prompts(prompts, groups, rng) for _ in range(k)]


@dataclass
class GroupExperience:
    """One iteration's groups of replies with what the update needs; B = G × k sequences."""

    sequences: Tensor  # (B, P + R)
    attention_mask: Tensor  # (B, P + R)
    action_mask: Tensor  # (B, R)
    logprobs: Tensor  # (B, R) log π_old(a_t) at the sampling temperature
    ref_logprobs: Tensor  # (B, R) log π_ref(a_t)
    scores: Tensor  # (B,) normalised reward-model score
    advantages: Tensor  # (B,) against the reply's group
    ended: Tensor  # (B,) bool
    full_kl: Tensor  # (B, R) KL(π_old || π_ref) over the vocabulary (0 on padding)
    entropy: Tensor  # (B, R)

    @property
    def response_len(self) -> int:
        return self.action_mask.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: Tensor) -> GroupExperience:  # index: (b,)
        return GroupExperience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def make_group_experience(
    stack: ModelStack,
    rollouts: Sequence[Rollout],
    normalization: RewardNormalization,
    objective: CriticFree,
    kl_coef: float,
    config: TrainerConfig,
) -> GroupExperience:
    """Score the groups' replies and give each its advantage."""
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    response_len = action_mask.shape[1]
    logprobs, entropy, ref_logprobs, full_kl = forward_passes(stack, sequences, attention_mask, response_len,
                                                              config.ppo)
    scores = score_rollouts(stack, sequences, attention_mask, normalization, config.ppo.forward_batch_size)  # (B,)
    rewards = scores if objective.kl_in_loss else kl_penalized_scores(scores, logprobs, ref_logprobs, action_mask,
                                                                      kl_coef)
    return GroupExperience(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask, logprobs=logprobs,
        ref_logprobs=ref_logprobs, scores=scores, advantages=objective.advantages(rewards, config.critic_free),
        ended=torch.tensor([r.ended for r in rollouts], device=stack.device), full_kl=full_kl * action_mask,
        entropy=entropy,
    )


# --- update ---------------------------------------------------------------------------------------------------


def _update(
    stack: ModelStack, optimizer: torch.optim.Optimizer, experience: GroupExperience, config: PPOConfig,
    kl_coef: float, generator: torch.Generator,
) -> dict[str, float]:
    """``config.epochs`` passes of shuffled minibatches, gradients accumulated over micro-batches; mean figures."""
    params = optimizer.param_groups[0]["params"]
    totals = dict.fromkeys(("policy_loss", "kl_loss", "approx_kl", "clip_fraction", "policy_grad_norm"), 0.0)
    steps = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(experience), generator=generator)
        for start in range(0, len(experience), config.minibatch_size):
            rows = order[start : start + config.minibatch_size].to(stack.device)
            optimizer.zero_grad(set_to_none=True)
            tokens = experience.action_mask[rows].sum().clamp(min=1)  # the whole minibatch's, on every rank
            mine = shard(rows)  # this rank's rows (all of them with one process)
            micro = config.micro_batch_size or max(1, len(mine))
            step = dict.fromkeys(("policy_loss", "kl_loss", "approx_kl", "clip_fraction"), 0.0)
            for first in range(0, len(mine), micro):
                batch = experience.select(mine[first : first + micro])
                share = (batch.action_mask.sum() / tokens).item()  # token-weighted: sums to the minibatch's mean
                with stack.use(POLICY):
                    logprobs = policy_logprobs(stack, batch.sequences, batch.attention_mask, batch.response_len,
                                               config.temperature)
                    loss, kl_term, stats = critic_free_loss(logprobs, batch.logprobs, batch.ref_logprobs,
                                                            batch.advantages, batch.action_mask, config.clip_eps,
                                                            kl_coef)
                    (share * loss).backward()
                for key, value in (("policy_loss", loss.item()), ("kl_loss", kl_term.item()),
                                   ("approx_kl", stats.approx_kl), ("clip_fraction", stats.clip_fraction)):
                    step[key] += share * value
            for key, value in all_reduce_grads(params, step).items():  # the ranks' shares add up
                totals[key] += value
            totals["policy_grad_norm"] += torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
            optimizer.step()
            steps += 1
    return {key: value / max(1, steps) for key, value in totals.items()}


# --- the loop -------------------------------------------------------------------------------------------------


@dataclass
class CriticFreeStats(IterationStats):
    """One GRPO or RLOO iteration: PPO's figures (the critic's are None) and the objective's own."""

    objective: str = ""
    """``grpo`` or ``rloo``."""
    kl_loss: float = 0.0
    """GRPO: the mean k3 KL per token of the loss's KL term over the update (RLOO: measured, not in the loss)."""
    flat_groups: float = 0.0
    """Share of groups whose replies all scored alike: advantage 0, nothing learned from that prompt."""
    samples_per_prompt: int = 0
    """k."""


def _kl_controller(config: TrainerConfig) -> KLController:
    ppo, start = config.ppo, config.critic_free.init_kl_coef
    return FixedKLController(start) if ppo.target_kl is None else AdaptiveKLController(start, ppo.target_kl,
                                                                                        ppo.kl_gain)


def run_critic_free(
    stack: ModelStack,
    backend: RolloutBackend,
    prompts: Sequence[list[int]],
    normalization: RewardNormalization,
    config: TrainerConfig,
    on_iteration: Callable[[IterationStats], None] | None = None,
    kl_coef: float | None = None,
) -> PPOResult:
    """Train the ``policy`` adapter with ``config.objective`` (``grpo`` or ``rloo``), the same call as
    :func:`alignd.trainer.ppo.run_ppo`. ``kl_coef`` (PPO's β carried over from an earlier run) is not used: β starts
    at ``critic_free.init_kl_coef`` every run."""
    objective = CRITIC_FREE[config.objective]
    ppo, k = config.ppo, config.critic_free.samples_per_prompt
    if k < 2:
        raise ValueError(f"{objective.name} needs at least 2 replies per prompt (the group is the baseline), got {k}")
    groups = max(1, ppo.rollout_batch_size // k)
    optimizer = torch.optim.AdamW(stack.role_parameters(POLICY), lr=ppo.learning_rate, eps=1e-5, weight_decay=0.0)
    same_start(optimizer.param_groups[0]["params"])
    controller = _kl_controller(config)
    torch.manual_seed(config.seed)
    rng, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    sampling = Sampling(temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens)
    started, history = time.monotonic(), []
    in_budget: dict[str, Tensor] | None = None
    for iteration in range(ppo.iterations):
        seconds: dict[str, float] = {}
        policy = stack.adapter_state(POLICY)
        # 1. Rollouts: k replies to each of a fresh sample of prompts.
        tick = time.monotonic()
        rollouts = backend.generate(stack, group_prompts(prompts, groups, k, rng), POLICY, sampling)
        seconds["rollout"] = time.monotonic() - tick
        # 2. Experience: log-probs, reference log-probs, scores, advantages against each group.
        tick = time.monotonic()
        used_kl_coef = controller.value
        experience = make_group_experience(stack, rollouts, normalization, objective, used_kl_coef, config)
        seconds["experience"] = time.monotonic() - tick
        kl = experience.full_kl.sum(-1).mean().item()
        if agreed(kl > config.gate.kl_budget):  # as PPO: hand the gate the last policy within the budget
            if in_budget is not None:
                stack.load_adapter_state(POLICY, in_budget)
            reason = (f"KL {kl:.2f} passed the budget {config.gate.kl_budget:.2f} at iteration {iteration}; "
                      f"kept the policy of iteration {iteration - 1 if in_budget is not None else iteration}")
            log.warning("%s stopped: %s", objective.name, reason)
            return PPOResult(history, controller.value, reason)
        in_budget = policy
        # 3. Update: the clipped ratio loss (plus GRPO's KL term).
        tick = time.monotonic()
        update = _update(stack, optimizer, experience, ppo, used_kl_coef if objective.kl_in_loss else 0.0,
                         generator)
        seconds["update"] = time.monotonic() - tick
        stats = _iteration_stats(iteration, objective.name, k, experience, update, used_kl_coef, seconds)
        controller.update(stats.kl)
        history.append(stats)
        log.info("%s iteration %d: reward %.3f kl %.3f β %.4f entropy %.3f approx_kl %.4f clip %.3f flat groups %.2f",
                 objective.name, iteration, stats.reward, stats.kl, used_kl_coef, stats.entropy, stats.approx_kl,
                 stats.clip_fraction, stats.flat_groups)
        if on_iteration is not None:
            on_iteration(stats)
        if agreed(ppo.time_limit_s is not None and time.monotonic() - started > ppo.time_limit_s):
            if iteration + 1 < ppo.iterations:
                return PPOResult(history, controller.value, f"time limit {ppo.time_limit_s:.0f} s reached")
            break
    return PPOResult(history, controller.value)


def _iteration_stats(iteration: int, name: str, k: int, experience: GroupExperience, update: dict[str, float],
                     kl_coef: float, seconds: dict[str, float]) -> CriticFreeStats:
    mask = experience.action_mask
    lengths = mask.sum(-1).float()  # (B,)
    flat = (experience.advantages.view(-1, k).abs().amax(-1) < 1e-6).float().mean().item()
    return CriticFreeStats(
        iteration=iteration,
        reward=experience.scores.mean().item(),
        kl=experience.full_kl.sum(-1).mean().item(),
        kl_coef=kl_coef,
        entropy=masked_mean(experience.entropy, mask).item(),
        approx_kl=update["approx_kl"],
        clip_fraction=update["clip_fraction"],
        policy_loss=update["policy_loss"],
        value_loss=None,
        policy_grad_norm=update["policy_grad_norm"],
        critic_grad_norm=None,
        explained_variance=None,
        eos_rate=experience.ended.float().mean().item(),
        response_length=lengths.mean().item(),
        tokens_per_s=lengths.sum().item() / max(seconds["rollout"], 1e-9),
        seconds={key: round(value, 3) for key, value in seconds.items()},
        objective=name,
        kl_loss=update["kl_loss"],
        flat_groups=flat,
        samples_per_prompt=k,
    )
