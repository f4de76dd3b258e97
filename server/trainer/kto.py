"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): the users' thumbs and
clear ratings as desirable or undesirable replies, no pairs needed.

Each reply's implicit reward is ``r = log π(y|x) − log π_ref(y|x)`` (the reference: the base with adapters off). The
loss is ``λ_D (1 − σ(β (r − z0)))`` for a desirable reply and ``λ_U (1 − σ(β (z0 − r)))`` for an undesirable one,
where the reference point ``z0`` is a batch estimate of KL(π || π_ref): the mean log-ratio of each prompt paired with
another example's reply, clamped at 0 and detached. λ_D and λ_U balance the classes. KTO trains on labels only; each
iteration the policy also samples a few replies so that reward and KL to the base are reported (and the KL budget
kept) as PPO's are.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alignd.store import Label
from alignd.trainer.config import KTOConfig, PPOConfig, TrainerConfig
from alignd.trainer.distributed import agreed, all_reduce_grads, same_start, shard
from alignd.trainer.feedback_sequences import (
    DPO_TEMPERATURE,
    SampledReplies,
    UserFeedback,
    keep_within_budget,
    measure_replies,
    reply_rollout,
    sequence_logprobs,
    summed_logprobs,
    weighted_draw,
)
from alignd.trainer.losses import masked_mean
from alignd.trainer.models import POLICY, ModelStack
from alignd.trainer.ppo import IterationStats, PPOResult, sample_prompts
from alignd.trainer.reward_model import RewardNormalization
from alignd.trainer.rollout import Rollout, RolloutBackend, Sampling, collate_rollouts, policy_logprobs

__all__ = ["KTOStats", "LabelBatch", "class_weights", "kto_loss", "mismatched", "reference_point", "run_kto"]

log = logging.getLogger(__name__)


# --- loss, reference point, weights (pure) --------------------------------------------------------------------


def reference_point(
    mismatched_logps: Tensor,  # (M,) log π(y_j | x_i), summed over the reply, for mismatched prompt and reply
    ref_mismatched_logps: Tensor,  # (M,) log π_ref(y_j | x_i)
) -> Tensor:
    """KTO's ``z0``, a scalar: the batch's mean log-ratio on mismatched examples (an estimate of KL(π || π_ref)),
    clamped at 0 and detached (no gradient flows through the reference point)."""
    return (mismatched_logps - ref_mismatched_logps).mean().clamp(min=0).detach()


def kto_loss(
    logps: Tensor,  # (M,) log π(y|x) summed over the reply, with gradient
    ref_logps: Tensor,  # (M,) log π_ref(y|x)
    desirable: Tensor,  # (M,) bool: a desirable (good) reply, else undesirable
    z0: Tensor,  # () the reference point
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[Tensor, Tensor]:
    """``(loss, rewards)``: the mean over the batch of ``λ_D (1 − σ(β (r − z0)))`` (desirable) or
    ``λ_U (1 − σ(β (z0 − r)))`` (undesirable), ``r = log π − log π_ref``; and each reply's implicit reward
    ``β r`` (M,), detached."""
    log_ratio = logps - ref_logps  # (M,)
    sign = desirable.to(log_ratio.dtype) * 2 - 1  # (M,) +1 desirable, −1 undesirable
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(log_ratio.dtype)  # (M,)
    losses = weight * (1 - torch.sigmoid(beta * sign * (log_ratio - z0)))  # (M,)
    return losses.mean(), (beta * log_ratio).detach()


def class_weights(desirable: float, undesirable: float, config: KTOConfig) -> tuple[float, float]:
    """``(λ_D, λ_U)``: the configured ones, or (when None) balanced over the classes' total weights so that
    ``λ_D · desirable = λ_U · undesirable``, the larger class's weight below 1 and the other's 1 (a class absent
    from the data keeps 1: it contributes nothing)."""
    lam_d, lam_u = config.desirable_weight, config.undesirable_weight
    if lam_d is not None and lam_u is not None:
        return lam_d, lam_u
    if desirable <= 0 or undesirable <= 0:
        return lam_d or 1.0, lam_u or 1.0
    if lam_d is not None:
        return lam_d, lam_d * desirable / undesirable
    if lam_u is not None:
        return lam_u * undesirable / desirable, lam_u
    return (undesirable / desirable, 1.0) if desirable >= undesirable else (1.0, desirable / undesirable)


def mismatched(n: int) -> Tensor:
    """For each of ``n`` examples, the example whose reply it is paired with for ``z0``: the next one, (n,)."""
    return (torch.arange(n) + 1) % n


# --- the iteration's labels -----------------------------------------------------------------------------------


@dataclass
class LabelBatch:
    """One iteration's labelled replies, M of them, and the same prompts with another example's reply."""

    sequences: Tensor  # (M, P + R) prompt + its labelled reply
    attention_mask: Tensor  # (M, P + R)
    action_mask: Tensor  # (M, R)
    ref_logps: Tensor  # (M,) log π_ref(y|x) summed over the reply
    old_logprobs: Tensor  # (M, R) log π per token before the update (for approx_kl)
    desirable: Tensor  # (M,) bool
    mis_sequences: Tensor  # (M, P' + R') prompt i + reply of example mismatched(M)[i]
    mis_attention_mask: Tensor  # (M, P' + R')
    mis_action_mask: Tensor  # (M, R')
    mis_ref_logps: Tensor  # (M,) log π_ref(y_j | x_i)

    def __len__(self) -> int:
        return self.desirable.shape[0]


def make_label_batch(stack: ModelStack, labels: list[Label], feedback: UserFeedback, config: TrainerConfig
                     ) -> LabelBatch:
    """Tokenise the labelled replies and their mismatched twins; reference and pre-update log-probs (no gradient)."""
    tokenizer, ppo = stack.tokenizer, config.ppo
    rollouts = [reply_rollout(tokenizer, x.prompt, x.reply, ppo.max_prompt_tokens, config.reward.max_reply_tokens,
                              feedback.truncated) for x in labels]
    twins = [Rollout(rollouts[i].prompt_ids, rollouts[j].response_ids, rollouts[j].ended)
             for i, j in enumerate(mismatched(len(rollouts)).tolist())]
    chunk = ppo.forward_batch_size
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, tokenizer.pad_token_id, stack.device)
    mis_sequences, mis_attention_mask, mis_action_mask = collate_rollouts(twins, tokenizer.pad_token_id, stack.device)
    ref = sequence_logprobs(stack, sequences, attention_mask, action_mask.shape[1], None, chunk)
    mis_ref = sequence_logprobs(stack, mis_sequences, mis_attention_mask, mis_action_mask.shape[1], None, chunk)
    return LabelBatch(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
        ref_logps=summed_logprobs(ref, action_mask),
        old_logprobs=sequence_logprobs(stack, sequences, attention_mask, action_mask.shape[1], POLICY, chunk),
        desirable=torch.tensor([x.good for x in labels], device=stack.device),
        mis_sequences=mis_sequences, mis_attention_mask=mis_attention_mask, mis_action_mask=mis_action_mask,
        mis_ref_logps=summed_logprobs(mis_ref, mis_action_mask))


# --- update ---------------------------------------------------------------------------------------------------

_KEYS = ("kto_loss", "reference_point", "desirable_reward", "undesirable_reward", "approx_kl", "policy_grad_norm")


def _update(stack: ModelStack, optimizer: torch.optim.Optimizer, batch: LabelBatch, ppo: PPOConfig, kto: KTOConfig,
            weights: tuple[float, float], generator: torch.Generator) -> dict[str, float]:
    """``ppo.epochs`` passes of shuffled minibatches: each minibatch's ``z0`` from its mismatched twins under the
    current policy, then its loss's gradients accumulated over micro-batches; means over the steps."""
    params = optimizer.param_groups[0]["params"]
    totals, steps = dict.fromkeys(_KEYS, 0.0), 0
    reward_sums, reward_counts = [0.0, 0.0], [0, 0]  # desirable, undesirable (over every rank)
    for _ in range(ppo.epochs):
        order = torch.randperm(len(batch), generator=generator).to(stack.device)
        for start in range(0, len(batch), ppo.minibatch_size):
            rows = order[start : start + ppo.minibatch_size]  # (n,)
            mis_logps = summed_logprobs(sequence_logprobs(
                stack, batch.mis_sequences[rows], batch.mis_attention_mask[rows], batch.mis_action_mask.shape[1],
                POLICY, ppo.forward_batch_size), batch.mis_action_mask[rows])  # (n,)
            z0 = reference_point(mis_logps, batch.mis_ref_logps[rows])
            optimizer.zero_grad(set_to_none=True)
            mine = shard(rows)  # this rank's rows (all of them with one process)
            micro = ppo.micro_batch_size or max(1, len(mine))
            step = dict.fromkeys(("kto_loss", "approx_kl", "desirable_sum", "desirable_n", "undesirable_sum",
                                  "undesirable_n"), 0.0)
            for first in range(0, len(mine), micro):
                part = mine[first : first + micro]  # (m,)
                share = len(part) / len(rows)  # the loss is a mean over the minibatch's replies
                mask = batch.action_mask[part]  # (m, R)
                with stack.use(POLICY):
                    logprobs = policy_logprobs(stack, batch.sequences[part], batch.attention_mask[part],
                                               mask.shape[1], DPO_TEMPERATURE) * mask  # (m, R)
                    loss, rewards = kto_loss(summed_logprobs(logprobs, mask), batch.ref_logps[part],
                                             batch.desirable[part], z0, kto.beta, *weights)
                    (share * loss).backward()
                with torch.no_grad():
                    log_ratio = logprobs.detach() - batch.old_logprobs[part]  # (m, R)
                    # per reply, then over the minibatch's replies: the same whatever the micro-batches hold
                    k3 = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask, dim=-1)  # (m,)
                    step["approx_kl"] += k3.sum().item() / len(rows)
                step["kto_loss"] += share * loss.item()
                for side, chosen in (("desirable", batch.desirable[part]), ("undesirable", ~batch.desirable[part])):
                    step[f"{side}_sum"] += rewards[chosen].sum().item()
                    step[f"{side}_n"] += chosen.sum().item()
            step = all_reduce_grads(params, step)  # the ranks' shares add up
            totals["kto_loss"] += step["kto_loss"]
            totals["approx_kl"] += step["approx_kl"]
            for side, index in (("desirable", 0), ("undesirable", 1)):
                reward_sums[index] += step[f"{side}_sum"]
                reward_counts[index] += int(step[f"{side}_n"])
            totals["reference_point"] += z0.item()
            totals["policy_grad_norm"] += torch.nn.utils.clip_grad_norm_(params, ppo.max_grad_norm).item()
            optimizer.step()
            steps += 1
    out = {key: value / max(1, steps) for key, value in totals.items()}
    out["desirable_reward"] = reward_sums[0] / max(1, reward_counts[0])
    out["undesirable_reward"] = reward_sums[1] / max(1, reward_counts[1])
    return out


# --- the loop -------------------------------------------------------------------------------------------------


@dataclass
class KTOStats(IterationStats):
    """One KTO iteration: PPO's figures of the replies the policy sampled (reward, KL, entropy, …; ``policy_loss``
    is KTO's loss, ``kl_coef`` its β; no critic, no ratio clipping) and KTO's own."""

    objective: str = "kto"
    """The objective's name."""
    reference_point: float = 0.0
    """Mean ``z0`` over the update's minibatches (the clamped estimate of KL(π || π_ref), nats)."""
    desirable_reward: float = 0.0
    """Mean implicit reward ``β (log π − log π_ref)`` of the desirable replies over the update."""
    undesirable_reward: float = 0.0
    """Mean implicit reward of the undesirable replies over the update."""
    desirable_weight: float = 1.0
    """λ_D used."""
    undesirable_weight: float = 1.0
    """λ_U used."""
    desirable_share: float = 0.0
    """Share of the iteration's labels that were desirable."""
    samples: int = 0
    """Labelled replies this iteration trained on (what ``bench/objectives.py`` counts as its samples)."""


def run_kto(
    stack: ModelStack,
    backend: RolloutBackend,
    prompts: Sequence[list[int]],
    normalization: RewardNormalization,
    config: TrainerConfig,
    on_iteration: Callable[[IterationStats], None] | None = None,
    kl_coef: float | None = None,
    feedback: UserFeedback | None = None,
) -> PPOResult:
    """Train the ``policy`` adapter with KTO on ``feedback.labels``, the same call as
    :func:`alignd.trainer.ppo.run_ppo` plus the users' labels; ``prompts`` are only for the replies that measure
    reward and KL. β is ``kto.beta`` (``kl_coef``, PPO's carried-over β, is not used)."""
    ppo, kto = config.ppo, config.kto
    labels = list((feedback or UserFeedback()).labels)
    if not labels:
        raise ValueError("KTO trains on good/bad labels (thumbs, clear ratings) and none were given")
    weights = [x.weight for x in labels]
    good = sum(w for x, w in zip(labels, weights, strict=True) if x.good)
    lambdas = class_weights(good, sum(weights) - good, kto)
    optimizer = torch.optim.AdamW(stack.role_parameters(POLICY), lr=ppo.learning_rate, eps=1e-5, weight_decay=0.0)
    same_start(optimizer.param_groups[0]["params"])
    torch.manual_seed(config.seed)
    rng, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    sampling = Sampling(temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens)
    started, history = time.monotonic(), []
    in_budget: dict[str, Tensor] | None = None
    for iteration in range(ppo.iterations):
        seconds: dict[str, float] = {}
        policy = stack.adapter_state(POLICY)
        # 1. Measure: the current policy answers a few prompts; their reward and KL to the base (and the budget).
        tick = time.monotonic()
        rollouts = backend.generate(stack, sample_prompts(prompts, kto.kl_samples, rng), POLICY, sampling)
        seconds["rollout"] = time.monotonic() - tick
        tick = time.monotonic()
        replies = measure_replies(stack, rollouts, normalization, config)
        if (reason := keep_within_budget(stack, replies.kl, config.gate.kl_budget, in_budget, iteration)) is not None:
            log.warning("kto stopped: %s", reason)
            return PPOResult(history, kto.beta, reason)
        in_budget = policy
        # 2. Labels: a weighted draw, tokenised with their mismatched twins; reference log-probs.
        drawn = weighted_draw(labels, weights, max(2, kto.labels_per_iteration), rng)
        batch = make_label_batch(stack, drawn, feedback or UserFeedback(), config)
        seconds["experience"] = time.monotonic() - tick
        # 3. Update: KTO's loss against the reference point.
        tick = time.monotonic()
        update = _update(stack, optimizer, batch, ppo, kto, lambdas, generator)
        seconds["update"] = time.monotonic() - tick
        stats = _iteration_stats(iteration, replies, update, batch, lambdas, kto.beta, seconds)
        history.append(stats)
        log.info("kto iteration %d: reward %.3f kl %.3f loss %.4f z0 %.3f rewards %.3f/%.3f", iteration, stats.reward,
                 stats.kl, stats.policy_loss, stats.reference_point, stats.desirable_reward,
                 stats.undesirable_reward)
        if on_iteration is not None:
            on_iteration(stats)
        if agreed(ppo.time_limit_s is not None and time.monotonic() - started > ppo.time_limit_s):
            if iteration + 1 < ppo.iterations:
                return PPOResult(history, kto.beta, f"time limit {ppo.time_limit_s:.0f} s reached")
            break
    return PPOResult(history, kto.beta)


def _iteration_stats(iteration: int, replies: SampledReplies, update: dict[str, float], batch: LabelBatch,
                     lambdas: tuple[float, float], beta: float, seconds: dict[str, float]) -> KTOStats:
    return KTOStats(
        iteration=iteration, **replies.figures(seconds["rollout"]), kl_coef=beta, approx_kl=update["approx_kl"],
        clip_fraction=0.0, policy_loss=update["kto_loss"], value_loss=None,
        policy_grad_norm=update["policy_grad_norm"], critic_grad_norm=None, explained_variance=None,
        seconds={key: round(value, 3) for key, value in seconds.items()},
        reference_point=update["reference_point"], desirable_reward=update["desirable_reward"],
        undesirable_reward=update["undesirable_reward"], desirable_weight=lambdas[0], undesirable_weight=lambdas[1],
        desirable_share=batch.desirable.float().mean().item(), samples=len(batch))
