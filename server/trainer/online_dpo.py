"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Calandriello et al. 2024):
DPO on pairs the current policy samples and the reward model ranks, plus the users' own pairs.

Per iteration: the policy answers each of a fresh sample of prompts k times (rollouts from the serving engine, as
GRPO's groups); the reward model's best and worst reply to each prompt make a pair (none when it cannot tell them
apart); a minibatch of the users' pairs, drawn in proportion to their weight, joins them; epochs × minibatches of
DPO's sigmoid loss ``-log σ(β · ((log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)))`` against the
reference, the base with adapters off. The sampled replies' KL to the base is measured and budgeted as PPO's.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignd.store import PreferencePair
from alignd.trainer.config import PPOConfig, TrainerConfig
from alignd.trainer.critic_free import group_prompts
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
from alignd.trainer.ppo import IterationStats, PPOResult
from alignd.trainer.reward_model import RewardNormalization
from alignd.trainer.rollout import Rollout, RolloutBackend, Sampling, collate_rollouts, policy_logprobs

__all__ = ["OnlineDPOStats", "PairBatch", "dpo_loss", "run_online_dpo", "select_pairs"]

log = logging.getLogger(__name__)


# --- loss and pair selection (pure) ---------------------------------------------------------------------------


def dpo_loss(
    chosen_logps: Tensor,  # (N,) log π(chosen | x), summed over the reply, with gradient
    rejected_logps: Tensor,  # (N,) log π(rejected | x)
    ref_chosen_logps: Tensor,  # (N,) log π_ref(chosen | x)
    ref_rejected_logps: Tensor,  # (N,) log π_ref(rejected | x)
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, chosen_rewards, rejected_rewards)``: DPO's sigmoid loss, the mean over pairs of
    ``-log σ(r_chosen − r_rejected)``, and each reply's implicit reward ``r = β · (log π − log π_ref)`` (N,),
    detached (their difference is the implicit-reward margin; its sign, the preference accuracy)."""
    chosen = beta * (chosen_logps - ref_chosen_logps)  # (N,)
    rejected = beta * (rejected_logps - ref_rejected_logps)  # (N,)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def select_pairs(
    scores: Tensor,  # (B,) B = G groups × k replies, each group's replies adjacent
    k: int,
    min_gap: float,
) -> tuple[Tensor, Tensor]:
    """``(chosen, rejected)``: for each group whose best and worst scores differ by at least ``min_gap``, the row of
    its best reply and of its worst (first of equals), each (G',); groups scored alike give no pair."""
    groups = scores.view(-1, k)  # (G, k)
    best, worst = groups.argmax(-1), groups.argmin(-1)  # (G,)
    gap = groups.amax(-1) - groups.amin(-1)  # (G,)
    keep = torch.nonzero(gap >= min_gap).squeeze(-1)  # (G',)
    offset = keep * k  # (G',) row of each kept group's first reply
    return offset + best[keep], offset + worst[keep]


# --- the iteration's pairs ------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """One iteration's pairs, N of them: row i and row N + i of the sequences are pair i's chosen and rejected."""

    sequences: Tensor  # (2N, P + R) chosen replies, then rejected ones
    attention_mask: Tensor  # (2N, P + R)
    action_mask: Tensor  # (2N, R)
    ref_logprobs: Tensor  # (2N, R) log π_ref per token
    old_logprobs: Tensor  # (2N, R) log π per token before the update (for approx_kl)
    from_users: Tensor  # (N,) bool: a user's pair (else sampled and ranked by the reward model)

    @property
    def response_len(self) -> int:
        return self.action_mask.shape[1]

    def __len__(self) -> int:
        return self.from_users.shape[0]

    def rows(self, pairs: Tensor) -> Tensor:  # pairs: (n,) -> (2n,) their chosen rows, then their rejected rows
        return torch.cat([pairs, pairs + len(self)])


def make_pair_batch(stack: ModelStack, sampled: list[tuple[Rollout, Rollout]], users: list[PreferencePair],
                    feedback: UserFeedback, config: TrainerConfig) -> PairBatch:
    """Tokenise the pairs and take their reference and pre-update log-probs (no gradient)."""
    tokenizer, ppo = stack.tokenizer, config.ppo

    def encode(pair: PreferencePair, reply: str) -> Rollout:
        return reply_rollout(tokenizer, pair.prompt, reply, ppo.max_prompt_tokens, config.reward.max_reply_tokens,
                             feedback.truncated)

    pairs = sampled + [(encode(p, p.chosen), encode(p, p.rejected)) for p in users]
    rollouts = [c for c, _ in pairs] + [r for _, r in pairs]
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, tokenizer.pad_token_id, stack.device)
    response_len, chunk = action_mask.shape[1], ppo.forward_batch_size
    return PairBatch(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
        ref_logprobs=sequence_logprobs(stack, sequences, attention_mask, response_len, None, chunk) * action_mask,
        old_logprobs=sequence_logprobs(stack, sequences, attention_mask, response_len, POLICY, chunk) * action_mask,
        from_users=torch.tensor([False] * len(sampled) + [True] * len(users), device=stack.device))


def sampled_pairs(rollouts: Sequence[Rollout], scores: Tensor, k: int, min_gap: float
                  ) -> list[tuple[Rollout, Rollout]]:
    """The reward model's best and worst reply of each group that it tells apart."""
    chosen, rejected = select_pairs(scores, k, min_gap)
    return [(rollouts[c], rollouts[r]) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)]


# --- update ---------------------------------------------------------------------------------------------------


def _update(stack: ModelStack, optimizer: torch.optim.Optimizer, batch: PairBatch, ppo: PPOConfig, beta: float,
            generator: torch.Generator) -> dict[str, float]:
    """``ppo.epochs`` passes of shuffled minibatches of pairs, gradients accumulated over micro-batches; means. A
    minibatch (and a micro-batch) holds as many sequences as PPO's: half as many pairs, so that an iteration takes as
    many optimizer steps as a PPO iteration over as many replies."""
    params = optimizer.param_groups[0]["params"]
    per_step = max(1, ppo.minibatch_size // 2)
    keys = ("dpo_loss", "reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward", "approx_kl",
            "policy_grad_norm")
    totals, steps = dict.fromkeys(keys, 0.0), 0
    for _ in range(ppo.epochs):
        order = torch.randperm(len(batch), generator=generator).to(stack.device)
        for start in range(0, len(batch), per_step):
            pairs = order[start : start + per_step]  # (n,)
            optimizer.zero_grad(set_to_none=True)
            mine = shard(pairs)  # this rank's pairs (all of them with one process)
            micro = max(1, (ppo.micro_batch_size or 2 * len(mine)) // 2)
            step = dict.fromkeys(keys[:-1], 0.0)
            for first in range(0, len(mine), micro):
                part = mine[first : first + micro]
                rows = batch.rows(part)  # (2m,)
                share = len(part) / len(pairs)  # the loss is a mean over pairs
                mask = batch.action_mask[rows]  # (2m, R)
                with stack.use(POLICY):
                    logprobs = policy_logprobs(stack, batch.sequences[rows], batch.attention_mask[rows],
                                               batch.response_len, DPO_TEMPERATURE) * mask  # (2m, R)
                    logps, ref = summed_logprobs(logprobs, mask), summed_logprobs(batch.ref_logprobs[rows], mask)
                    m = len(part)
                    loss, chosen, rejected = dpo_loss(logps[:m], logps[m:], ref[:m], ref[m:], beta)
                    (share * loss).backward()
                with torch.no_grad():  # per reply, then over replies: the same whatever the micro-batches hold
                    log_ratio = logprobs.detach() - batch.old_logprobs[rows]  # (2m, R)
                    approx_kl = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask, dim=-1).mean().item()
                margin = chosen - rejected  # (m,)
                for key, value in (("dpo_loss", loss.item()), ("reward_margin", margin.mean().item()),
                                   ("preference_accuracy", (margin > 0).float().mean().item()),
                                   ("chosen_reward", chosen.mean().item()),
                                   ("rejected_reward", rejected.mean().item()), ("approx_kl", approx_kl)):
                    step[key] += share * value
            for key, value in all_reduce_grads(params, step).items():  # the ranks' shares add up
                totals[key] += value
            totals["policy_grad_norm"] += torch.nn.utils.clip_grad_norm_(params, ppo.max_grad_norm).item()
            optimizer.step()
            steps += 1
    return {key: value / max(1, steps) for key, value in totals.items()}


# --- the loop -------------------------------------------------------------------------------------------------


@dataclass
class OnlineDPOStats(IterationStats):
    """One online-DPO iteration: PPO's figures (reward, KL, entropy, … of the sampled replies; ``policy_loss`` is
    DPO's loss, ``kl_coef`` its β; no critic, no ratio clipping) and DPO's own."""

    objective: str = "online-dpo"
    """The objective's name."""
    reward_margin: float = 0.0
    """Mean implicit-reward margin ``r_chosen − r_rejected`` over the update's pairs, ``r = β (log π − log π_ref)``."""
    preference_accuracy: float = 0.0
    """Share of the update's pairs whose chosen reply has the larger implicit reward."""
    chosen_reward: float = 0.0
    """Mean implicit reward of the chosen replies over the update."""
    rejected_reward: float = 0.0
    """Mean implicit reward of the rejected replies over the update."""
    sampled_pairs: int = 0
    """Pairs of the policy's own replies ranked by the reward model this iteration."""
    user_pairs: int = 0
    """Users' pairs this iteration trained on."""
    tied_prompts: float = 0.0
    """Share of sampled prompts whose replies the reward model did not tell apart (no pair)."""
    samples_per_prompt: int = 0
    """k."""


def run_online_dpo(
    stack: ModelStack,
    backend: RolloutBackend,
    prompts: Sequence[list[int]],
    normalization: RewardNormalization,
    config: TrainerConfig,
    on_iteration: Callable[[IterationStats], None] | None = None,
    kl_coef: float | None = None,
    feedback: UserFeedback | None = None,
) -> PPOResult:
    """Train the ``policy`` adapter with online DPO, the same call as :func:`alignd.trainer.ppo.run_ppo` plus the
    users' pairs in ``feedback``. β is ``online_dpo.beta`` (``kl_coef``, PPO's carried-over β, is not used)."""
    ppo, dpo = config.ppo, config.online_dpo
    k = dpo.samples_per_prompt
    if k < 2:
        raise ValueError(f"online DPO needs at least 2 replies per prompt (its best and worst are a pair), got {k}")
    feedback = feedback or UserFeedback()
    users = [pair for group in feedback.pairs for pair in group]
    groups = max(1, ppo.rollout_batch_size // k)
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
        # 1. Rollouts: k replies to each of a fresh sample of prompts.
        tick = time.monotonic()
        rollouts = backend.generate(stack, group_prompts(prompts, groups, k, rng), POLICY, sampling)
        seconds["rollout"] = time.monotonic() - tick
        # 2. Pairs: the reward model's best and worst of each group, then users' pairs; their log-probs.
        tick = time.monotonic()
        replies = measure_replies(stack, rollouts, normalization, config)
        if (reason := keep_within_budget(stack, replies.kl, config.gate.kl_budget, in_budget, iteration)) is not None:
            log.warning("online-dpo stopped: %s", reason)
            return PPOResult(history, dpo.beta, reason)
        in_budget = policy
        sampled = sampled_pairs(rollouts, replies.scores, k, dpo.min_score_gap)
        drawn = weighted_draw(users, [p.weight for p in users], dpo.user_pairs, rng)
        seconds["experience"] = time.monotonic() - tick
        update = None
        if sampled or drawn:  # every prompt tied and no user pairs: nothing to learn from this iteration
            batch = make_pair_batch(stack, sampled, drawn, feedback, config)
            seconds["experience"] = time.monotonic() - tick
            # 3. Update: DPO's loss against the reference.
            tick = time.monotonic()
            update = _update(stack, optimizer, batch, ppo, dpo.beta, generator)
            seconds["update"] = time.monotonic() - tick
        stats = _iteration_stats(iteration, replies, update, len(sampled), len(drawn), groups, k, dpo.beta, seconds)
        history.append(stats)
        log.info("online-dpo iteration %d: reward %.3f kl %.3f loss %.4f margin %.3f accuracy %.2f pairs %d+%d",
                 iteration, stats.reward, stats.kl, stats.policy_loss, stats.reward_margin,
                 stats.preference_accuracy, stats.sampled_pairs, stats.user_pairs)
        if on_iteration is not None:
            on_iteration(stats)
        if agreed(ppo.time_limit_s is not None and time.monotonic() - started > ppo.time_limit_s):
            if iteration + 1 < ppo.iterations:
                return PPOResult(history, dpo.beta, f"time limit {ppo.time_limit_s:.0f} s reached")
            break
    return PPOResult(history, dpo.beta)


def _iteration_stats(iteration: int, replies: SampledReplies, update: dict[str, float] | None, sampled: int,
                     users: int, groups: int, k: int, beta: float, seconds: dict[str, float]) -> OnlineDPOStats:
    update = update or dict.fromkeys(("dpo_loss", "reward_margin", "preference_accuracy", "chosen_reward",
                                      "rejected_reward", "approx_kl", "policy_grad_norm"), 0.0)
    return OnlineDPOStats(
        iteration=iteration, **replies.figures(seconds["rollout"]), kl_coef=beta,
        approx_kl=update["approx_kl"], clip_fraction=0.0, policy_loss=update["dpo_loss"], value_loss=None,
        policy_grad_norm=update["policy_grad_norm"], critic_grad_norm=None, explained_variance=None,
        seconds={key: round(value, 3) for key, value in seconds.items()},
        reward_margin=update["reward_margin"], preference_accuracy=update["preference_accuracy"],
        chosen_reward=update["chosen_reward"], rejected_reward=update["rejected_reward"], sampled_pairs=sampled,
        user_pairs=users, tied_prompts=1 - sampled / groups, samples_per_prompt=k)

