"""PPO on the policy adapter, following "The N Implementation Details of RLHF with PPO".

Per iteration: sample prompts, generate one reply each with the current policy (in the serving engine), recompute
log-probs in the trainer at the sampling temperature, score replies with the reward model at their last token,
turn ``score - β·KL`` into per-token rewards, estimate advantages with GAE, whiten them, and take epochs ×
minibatches of clipped policy and value steps. β follows an adaptive controller towards a target KL. The critic is
a value head on the reward model's hidden states (:mod:`alignd.trainer.critic`), read in the scoring pass.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignd.trainer.config import PPOConfig, TrainerConfig
from alignd.trainer.critic import ValueHead
from alignd.trainer.distributed import agreed, all_reduce_grads, map_rows, same_start, shard
from alignd.trainer.logprobs import token_kl, token_logprobs, token_logprobs_and_entropy
from alignd.trainer.losses import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    compute_gae,
    explained_variance,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from alignd.trainer.models import POLICY, REWARD, ModelStack
from alignd.trainer.reward_model import RewardNormalization, score_with_features
from alignd.trainer.rollout import Experience, Rollout, RolloutBackend, Sampling, collate_rollouts, policy_logprobs

__all__ = [
    "IterationStats",
    "PPOResult",
    "UpdateStats",
    "forward_passes",
    "init_critic",
    "kl_penalized_rewards",
    "make_experience",
    "make_kl_controller",
    "make_optimizer",
    "ppo_update",
    "run_ppo",
    "sample_prompts",
]

log = logging.getLogger(__name__)


@dataclass
class UpdateStats:
    """Means over the minibatch steps of one PPO update."""

    policy_loss: float
    value_loss: float
    approx_kl: float
    clip_fraction: float
    policy_grad_norm: float
    """Before clipping (each model is clipped on its own)."""
    critic_grad_norm: float


@dataclass
class IterationStats:
    """What one PPO iteration logs (the critic-free objectives log the same, and their own figures beside)."""

    iteration: int
    reward: float
    """Mean normalised reward-model score of the iteration's replies (KL penalty not included)."""
    kl: float
    """Mean over replies of the summed per-token KL(π || π_ref) over the vocabulary (nats; see
    :func:`alignd.trainer.logprobs.token_kl`): what β is steered by and the budget checked on."""
    kl_coef: float
    """β used for this iteration's rewards."""
    entropy: float
    """Mean per-token entropy of the policy at the sampling temperature."""
    approx_kl: float
    """How far the update moved the policy from the rollout policy."""
    clip_fraction: float
    policy_loss: float
    value_loss: float | None
    """None for the critic-free objectives (no critic), like the two below."""
    policy_grad_norm: float
    critic_grad_norm: float | None
    explained_variance: float | None
    """Of the returns by the rollout-time values."""
    eos_rate: float
    """Share of replies that ended with EOS."""
    response_length: float
    """Mean reply length in tokens."""
    tokens_per_s: float
    """Reply tokens generated per second of the rollout phase."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per phase: rollout, experience, update."""


# --- setup ----------------------------------------------------------------------------------------------------


def init_critic(stack: ModelStack, normalization: RewardNormalization) -> ValueHead:
    """A value head on the reward adapter's features, started as the reward head on the normalised scale PPO
    trains it on (a better start than random: V(s_t) is then the reward model's score of the prefix)."""
    return ValueHead.from_reward_head(stack.heads[REWARD], normalization.mean, normalization.std)


def make_optimizer(stack: ModelStack, critic: ValueHead, config: PPOConfig) -> torch.optim.AdamW:
    """One AdamW over policy and critic, each with its learning rate (param group 0: policy, 1: critic)."""
    groups = [
        {"params": stack.role_parameters(POLICY), "lr": config.learning_rate},
        {"params": list(critic.parameters()), "lr": config.critic_learning_rate},
    ]
    return torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)


def make_kl_controller(config: PPOConfig, kl_coef: float | None = None) -> KLController:
    """The adaptive controller towards ``target_kl``, or a fixed β when there is no target; starting at
    ``kl_coef`` (where the previous run left β) or the configured initial β."""
    if config.target_kl is None:
        return FixedKLController(config.init_kl_coef)  # a fixed β is the configured one, not an earlier run's
    if kl_coef is None:
        return AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_gain)
    return AdaptiveKLController(kl_coef, config.target_kl, config.kl_gain, engaged=True)


# --- experience -----------------------------------------------------------------------------------------------


def kl_penalized_rewards(
    logprobs: Tensor,  # (B, R) policy
    ref_logprobs: Tensor,  # (B, R) reference
    scores: Tensor,  # (B,) reward-model score per reply
    mask: Tensor,  # (B, R)
    kl_coef: float,
) -> tuple[Tensor, Tensor]:
    """``(rewards, kl)``, both (B, R): ``-β·(log π - log π_ref)`` per token, the score added at the last token."""
    kl = (logprobs - ref_logprobs) * mask  # (B, R)
    rewards = -kl_coef * kl  # (B, R)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) position of each reply's last token
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def forward_passes(
    stack: ModelStack, sequences: Tensor, attention_mask: Tensor, response_len: int, config: PPOConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logprobs, entropy, ref_logprobs, full_kl)``, each (B, R), in chunks of ``forward_batch_size`` (shared
    with the critic-free objectives); with several processes each rank passes its block of rows."""
    logprobs, entropy, ref_logprobs, full_kl = map_rows(
        lambda a, b: _forward_passes(stack, sequences[a:b], attention_mask[a:b], response_len, config),
        sequences.shape[0])
    return logprobs, entropy, ref_logprobs, full_kl


@torch.no_grad()
def _forward_passes(
    stack: ModelStack, sequences: Tensor, attention_mask: Tensor, response_len: int, config: PPOConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, sequences.shape[0], config.forward_batch_size):
        seq = sequences[start : start + config.forward_batch_size]  # (b, P + R)
        mask = attention_mask[start : start + config.forward_batch_size]  # (b, P + R)
        with stack.use(POLICY):
            logits = stack.response_logits(seq, mask, response_len)  # (b, R, V)
            logprobs, entropy = token_logprobs_and_entropy(logits, seq[:, -response_len:], config.temperature)
        with stack.use(None):
            ref_logits = stack.response_logits(seq, mask, response_len)  # (b, R, V)
            ref_logprobs = token_logprobs(ref_logits, seq[:, -response_len:], config.temperature)
        full_kl = token_kl(logits, ref_logits, config.temperature)  # (b, R)
        del logits, ref_logits  # the largest tensors here; free them before the next chunk
        parts.append((logprobs, entropy, ref_logprobs, full_kl))
    logprobs, entropy, ref_logprobs, full_kl = (torch.cat(p) for p in zip(*parts, strict=True))
    return logprobs, entropy, ref_logprobs, full_kl


def make_experience(
    stack: ModelStack,
    critic: ValueHead,
    rollouts: Sequence[Rollout],
    normalization: RewardNormalization,
    kl_coef: float,
    config: PPOConfig,
) -> Experience:
    """Score the rollouts and turn them into PPO training data."""
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    response_len = action_mask.shape[1]
    logprobs, entropy, ref_logprobs, full_kl = forward_passes(stack, sequences, attention_mask, response_len, config)
    ended = torch.tensor([r.ended for r in rollouts], device=stack.device)  # (B,)
    # Scored as sampled: a reply cut at the cap ends without a stop token, which the reward model has seen on
    # truncated replies in training, so no penalty for length (in either direction) is added here.
    scores, features = score_with_features(stack, sequences, attention_mask, normalization, response_len,
                                           config.forward_batch_size)  # (B,), (B, R, H)
    with torch.no_grad():
        values = critic(features) * action_mask  # (B, R)
    rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, scores, action_mask, kl_coef)
    advantages, returns = compute_gae(rewards, values, action_mask, config.gamma, config.lam)
    return Experience(
        sequences=sequences,
        attention_mask=attention_mask,
        action_mask=action_mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        features=features,
        rewards=rewards,
        advantages=whiten(advantages, action_mask),
        returns=returns,
        scores=scores,
        ended=ended,
        kl=kl,
        full_kl=full_kl * action_mask,
        entropy=entropy,
    )


# --- update ---------------------------------------------------------------------------------------------------


def ppo_update(
    stack: ModelStack,
    critic: ValueHead,
    optimizer: torch.optim.Optimizer,
    experience: Experience,
    config: PPOConfig,
    generator: torch.Generator,
) -> UpdateStats:
    """``config.epochs`` passes of shuffled minibatches: clipped policy loss, clipped value loss; each minibatch's
    gradients accumulated over micro-batches of ``micro_batch_size``, each model's clipped on its own."""
    policy_params, critic_params = optimizer.param_groups[0]["params"], optimizer.param_groups[1]["params"]
    totals = dict.fromkeys(("policy_loss", "value_loss", "approx_kl", "clip_fraction", "policy_grad_norm",
                            "critic_grad_norm"), 0.0)
    steps = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(experience), generator=generator)
        for start in range(0, len(experience), config.minibatch_size):
            rows = order[start : start + config.minibatch_size].to(stack.device)
            optimizer.zero_grad(set_to_none=True)
            step = _accumulate(stack, critic, experience, rows, config)
            step = all_reduce_grads([*policy_params, *critic_params], step)  # the ranks' shares add up
            step["policy_grad_norm"] = torch.nn.utils.clip_grad_norm_(policy_params, config.max_grad_norm).item()
            step["critic_grad_norm"] = torch.nn.utils.clip_grad_norm_(critic_params, config.critic_max_grad_norm).item()
            optimizer.step()
            steps += 1
            for key, value in step.items():
                totals[key] += value
    return UpdateStats(**{key: value / max(1, steps) for key, value in totals.items()})


def _accumulate(
    stack: ModelStack, critic: ValueHead, experience: Experience, rows: Tensor, config: PPOConfig
) -> dict[str, float]:
    """Backward passes of this rank's share of one minibatch (``rows``; all of them with one process), a
    micro-batch at a time; its share of the minibatch's mean losses and statistics."""
    tokens = experience.action_mask[rows].sum().clamp(min=1)  # the whole minibatch's: shares add up over ranks
    rows = shard(rows)  # type: ignore[assignment]
    micro = config.micro_batch_size or max(1, len(rows))
    out = dict.fromkeys(("policy_loss", "value_loss", "approx_kl", "clip_fraction"), 0.0)
    for start in range(0, len(rows), micro):
        batch = experience.select(rows[start : start + micro])
        # The losses are means over reply tokens: weighted by their share of tokens, the micro-batches' gradients add
        # up to exactly the minibatch's.
        share = (batch.action_mask.sum() / tokens).item()
        with stack.use(POLICY):
            logprobs = policy_logprobs(stack, batch.sequences, batch.attention_mask, batch.response_len,
                                       config.temperature)
            pg_loss, pg_stats = policy_loss(logprobs, batch.logprobs, batch.advantages, batch.action_mask,
                                            config.clip_eps)
            (share * pg_loss).backward()
        # The critic reads the reward pass's features: no pass through the model.
        values = critic(batch.features)  # (b, R)
        vf_loss = value_loss(values, batch.values, batch.returns, batch.action_mask, config.value_clip)
        (share * config.vf_coef * vf_loss).backward()
        for key, value in (("policy_loss", pg_loss.item()), ("value_loss", vf_loss.item()),
                           ("approx_kl", pg_stats.approx_kl), ("clip_fraction", pg_stats.clip_fraction)):
            out[key] += share * value
    return out


# --- the loop -------------------------------------------------------------------------------------------------


def sample_prompts(prompts: Sequence[list[int]], n: int, rng: random.Random) -> list[list[int]]:
    """``n`` distinct prompts when there are enough, otherwise drawn with replacement."""
    return rng.sample(list(prompts), n) if len(prompts) >= n else rng.choices(list(prompts), k=n)


def _iteration_stats(
    iteration: int, experience: Experience, update: UpdateStats, kl_coef: float, seconds: dict[str, float]
) -> IterationStats:
    mask = experience.action_mask
    lengths = mask.sum(-1).float()  # (B,)
    return IterationStats(
        iteration=iteration,
        reward=experience.scores.mean().item(),
        kl=experience.full_kl.sum(-1).mean().item(),
        kl_coef=kl_coef,
        entropy=masked_mean(experience.entropy, mask).item(),
        approx_kl=update.approx_kl,
        clip_fraction=update.clip_fraction,
        policy_loss=update.policy_loss,
        value_loss=update.value_loss,
        policy_grad_norm=update.policy_grad_norm,
        critic_grad_norm=update.critic_grad_norm,
        explained_variance=explained_variance(experience.values, experience.returns, mask),
        eos_rate=experience.ended.float().mean().item(),
        response_length=lengths.mean().item(),
        tokens_per_s=lengths.sum().item() / max(seconds["rollout"], 1e-9),
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )


@dataclass
class PPOResult:
    """What a PPO phase leaves: its iterations, where β ended, and why it stopped early, if it did."""

    history: list[IterationStats]
    kl_coef: float
    """β for the next iteration, or the next run (the controller's state carries over)."""
    stopped: str | None = None
    """Why PPO stopped before its last iteration (KL past the budget, the time limit), None if it did not."""


def run_ppo(
    stack: ModelStack,
    backend: RolloutBackend,
    prompts: Sequence[list[int]],
    normalization: RewardNormalization,
    config: TrainerConfig,
    on_iteration: Callable[[IterationStats], None] | None = None,
    kl_coef: float | None = None,
) -> PPOResult:
    """Train the ``policy`` adapter of ``stack`` against its ``reward`` adapter.

    ``prompts`` are rendered prompt token ids (see :func:`alignd.trainer.rollout.encode_prompt`). Each run starts
    a fresh critic from the reward head, and β from ``kl_coef`` (where the previous run left it) when given. When
    an iteration's rollouts show KL past the gate's budget, PPO stops and the policy goes back to the last one whose
    rollouts were within it, so a run hands the gate an in-budget candidate instead of discarding all its work.
    """
    ppo = config.ppo
    critic = init_critic(stack, normalization)
    optimizer = make_optimizer(stack, critic, ppo)
    same_start(p for group in optimizer.param_groups for p in group["params"])
    kl_controller = make_kl_controller(ppo, kl_coef)
    torch.manual_seed(config.seed)  # trainer-side sampling (HF rollouts) draws from the global generator
    rng, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    sampling = Sampling(temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens)
    started, history = time.monotonic(), []
    in_budget: dict[str, Tensor] | None = None  # the newest policy whose rollouts were within the KL budget
    for iteration in range(ppo.iterations):
        seconds: dict[str, float] = {}
        policy = stack.adapter_state(POLICY)  # what generates this iteration's rollouts
        # 1. Rollouts: the current policy answers a fresh sample of prompts.
        tick = time.monotonic()
        rollouts = backend.generate(stack, sample_prompts(prompts, ppo.rollout_batch_size, rng), POLICY, sampling)
        seconds["rollout"] = time.monotonic() - tick
        # 2. Experience: log-probs, reference log-probs, values, scores, rewards, advantages.
        tick = time.monotonic()
        used_kl_coef = kl_controller.value
        experience = make_experience(stack, critic, rollouts, normalization, used_kl_coef, ppo)
        seconds["experience"] = time.monotonic() - tick
        kl = experience.full_kl.sum(-1).mean().item()
        if agreed(kl > config.gate.kl_budget):
            kl_controller.update(kl)  # the next run starts from a β that has seen this KL
            if in_budget is not None:  # the last update (in history) is undone
                stack.load_adapter_state(POLICY, in_budget)
            reason = (f"KL {kl:.2f} passed the budget {config.gate.kl_budget:.2f} at iteration {iteration}; "
                      f"kept the policy of iteration {iteration - 1 if in_budget is not None else iteration}")
            log.warning("ppo stopped: %s", reason)
            return PPOResult(history, kl_controller.value, reason)
        in_budget = policy
        # 3. Update: epochs × minibatches of clipped policy and value steps.
        tick = time.monotonic()
        update = ppo_update(stack, critic, optimizer, experience, ppo, generator)
        seconds["update"] = time.monotonic() - tick
        # 4. Adapt β towards the target KL, and report.
        stats = _iteration_stats(iteration, experience, update, used_kl_coef, seconds)
        kl_controller.update(stats.kl)
        history.append(stats)
        log.info("ppo iteration %d: reward %.3f kl %.3f β %.4f entropy %.3f approx_kl %.4f clip %.3f "
                 "explained variance %.3f grad norms %.2f/%.2f %.0f tokens/s", iteration, stats.reward, stats.kl,
                 used_kl_coef, stats.entropy, stats.approx_kl, stats.clip_fraction, stats.explained_variance,
                 stats.policy_grad_norm, stats.critic_grad_norm, stats.tokens_per_s)
        if on_iteration is not None:
            on_iteration(stats)
        if agreed(ppo.time_limit_s is not None and time.monotonic() - started > ppo.time_limit_s):
            if iteration + 1 < ppo.iterations:
                return PPOResult(history, kl_controller.value, f"time limit {ppo.time_limit_s:.0f} s reached")
            break
    return PPOResult(history, kl_controller.value)
