"""One training run, start to candidate: data → reward model → normalisation → PPO (or the run's objective) → gate →
staged adapter.

Runs inside the trainer process (entered through :mod:`alignd.trainer.child`); talks to the server only through a
:class:`Reporter` (phase, progress, figures) and the rollout link. Registration and promotion are the server's (it
owns the registry).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from alignd.store import Store
from alignd.trainer import distributed
from alignd.trainer.config import scale_batches_to_model, scale_to_model
from alignd.trainer.critic_free import run_critic_free
from alignd.trainer.data import TrainingData, leave_out_flagged, length_cap, load_training_data
from alignd.trainer.feedback_sequences import UserFeedback
from alignd.trainer.gate import Scorer, decide, evaluate, save_decision
from alignd.trainer.implicit_reward import implicit_reward_check
from alignd.trainer.job import RunJob, RunResult
from alignd.trainer.judge import JUDGE, JUDGE_FOLDER, JudgeSplit, previous_judge, split_for_judge
from alignd.trainer.kto import run_kto
from alignd.trainer.models import POLICY, REWARD, ModelStack, load_stack, resolve_device
from alignd.trainer.online_dpo import run_online_dpo
from alignd.trainer.ppo import IterationStats, PPOResult, run_ppo
from alignd.trainer.reward_model import (
    RewardFigures,
    fit_normalization,
    heldout_figures,
    save_reward_model,
    train_reward_model,
)
from alignd.trainer.rollout import RemoteRollouts, RolloutBackend, RolloutLink, Sampling, encode_prompt
from alignd.trainer.safeguards import record_scores, screen_users

log = logging.getLogger(__name__)

Optimizer = Callable[..., PPOResult]
"""``(stack, backend, prompts, normalization, config, on_iteration=, kl_coef=) -> PPOResult``: one objective's
policy-optimisation phase (those in :data:`TRAINS_ON_FEEDBACK` also take ``feedback=``)."""

OPTIMIZERS: dict[str, Optimizer] = {"ppo": run_ppo, "grpo": run_critic_free, "rloo": run_critic_free,
                                    "online-dpo": run_online_dpo, "kto": run_kto}
"""The policy-optimisation phase of each ``--objective``; every one shares the run's data, reward model, rollouts,
gate and registration."""

TRAINS_ON_FEEDBACK = {"online-dpo", "kto"}
"""Objectives that train on the users' own judgements too (``feedback=``: a :class:`UserFeedback` of the reward
model's side of the judge split, so the gate's judge still judges a policy trained apart from its feedback)."""

OPTIMIZES_REWARD_MODEL = {"ppo", "grpo", "rloo", "online-dpo"}
"""Objectives whose updates follow the reward model's scores: for these a reward model not shown to beat chance
stops the run before the optimisation. KTO learns from the users' labels alone (the reward model only reports the
reward of its samples), so its runs go on, the check's figures reported."""

CARRIES_KL_COEF = {"ppo"}
"""Objectives whose final β the next run starts from (the critic-free ones start from their own each run)."""

CURRENT = "current"
"""Adapter name of the policy the run started from, in the trainer's stack (for the gate)."""

# Share of the whole run at the start of each phase (the progress bar's scale).
PHASE_START = {"data": 0.0, "reward_model": 0.05, "normalize": 0.30, "ppo": 0.35, "gate": 0.85, "register": 0.95}


class NoTrainingData(Exception):
    """The store holds nothing this run could learn from."""


class RewardModelNotBetterThanChance(Exception):
    """The reward model's held-out accuracy is not above 0.5 with the configured confidence: PPO would optimise
    noise, so the run stops before it (the reward model is kept: the next run continues from it)."""


class Reporter(Protocol):
    """Where a run reports how it is doing (the server writes it to the run's row and to /metrics)."""

    def report(self, phase: str, progress: float, metrics: dict[str, Any] | None = None) -> None: ...


async def _read_data(job: RunJob) -> TrainingData:
    store = await Store.open(job.database_url)
    try:
        return await load_training_data(store, job.config.data, seed=job.config.seed)
    finally:
        await store.close()


def _prompt_ids(stack: ModelStack, prompts: list[list[dict[str, str]]], max_tokens: int) -> list[list[int]]:
    return [encode_prompt(stack.tokenizer, p, max_tokens) for p in prompts]


def _sample(items: list[list[int]], n: int, rng: random.Random) -> list[list[int]]:
    return rng.sample(items, n) if len(items) >= n else rng.choices(items, k=n)


def _ppo_reporter(reporter: Reporter, iterations: int, history: list[dict[str, Any]]
                  ) -> Callable[[IterationStats], None]:
    span = PHASE_START["gate"] - PHASE_START["ppo"]

    def on_iteration(stats: IterationStats) -> None:
        history.append(asdict(stats))
        reporter.report("ppo", PHASE_START["ppo"] + span * (stats.iteration + 1) / iterations, {"ppo": history})

    return on_iteration


def run_training(job: RunJob, reporter: Reporter, link: RolloutLink | None) -> RunResult | None:
    """The cycle, in numbered phases; raises on failure (the child process reports it and the run is marked failed).

    With several processes (:mod:`alignd.trainer.distributed`) every rank runs it in step: rank 0 reads the data, asks
    for rollouts (``link``; None on the others), reports and writes files; the other ranks return None once policy
    optimisation is done, and rank 0 runs the gate alone (with the base sharded, ``fsdp``, once the gate's passes
    are done: they need every rank)."""
    config, seconds = job.config, {}
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)

    # 1. Data: pairs, labels and prompts from the store.
    tick = time.monotonic()
    reporter.report("data", PHASE_START["data"])
    data = distributed.from_main(lambda: asyncio.run(_read_data(job)))
    if not (data.train_pairs or data.train_labels):
        raise NoTrainingData(f"no training signal outside the held-out split ({data.counts()})")
    if not (data.ppo_prompts or data.gate_prompts):
        raise NoTrainingData("no user prompts in the store to run PPO on")
    seconds["data"] = time.monotonic() - tick
    # Rollouts and the gate generate as long as users are served (their 95th percentile), within the setting.
    cap = length_cap(data.served_lengths, config.ppo.max_new_tokens)
    config.ppo.max_new_tokens = config.gate.max_new_tokens = cap
    split = split_for_judge(data.train_pairs, data.train_labels, config.data.judge_fraction)
    if not (split.reward_groups or split.reward_labels):
        raise NoTrainingData(f"no training signal outside the judge's and the held-out splits ({data.counts()})")
    _check_objective_signal(config.objective, split, data)
    if config.data.judge_fraction > 0 and not split.judge_has_signal:
        raise NoTrainingData(
            "no feedback on the gate's judge's side yet (its share of prompts: --judge-fraction "
            f"{config.data.judge_fraction}); collect more feedback, or set --judge-fraction 0 to let PPO's reward "
            "model judge its own candidate")
    counts = {**data.counts(), **split.counts(), "gate_prompts_held_out": bool(data.gate_prompts),
              "length_cap": cap, "processes": distributed.world()}
    if len(data.gate_prompts) < config.gate.min_prompts:  # few distinct prompts yet: say so in the figures
        log.warning("%d held-out prompts: the gate tops them up to %d with training prompts", len(data.gate_prompts),
                    config.gate.min_prompts)
    reporter.report("reward_model", PHASE_START["reward_model"],
                    {"data": counts, "distributed": distributed.describe()})

    # 2. Reward model on the frozen base (the policy adapter starts from the parent's).
    tick = time.monotonic()
    stack = load_stack(job.base_model, config, on_cpu=distributed.sharded())
    distributed.shard_base(stack, resolve_device(config.device))  # fsdp: the base over the ranks
    counts["learning_rate_scale"] = scale_to_model(config, stack.base_parameters)
    counts.update(scale_batches_to_model(config, stack.base_parameters))
    reporter.report("reward_model", PHASE_START["reward_model"], {"data": counts})
    if job.parent_adapter is not None:
        stack.load_adapter(CURRENT, job.parent_adapter)  # first: PEFT cannot drop a model's only adapter
        stack.load_adapter(POLICY, job.parent_adapter)
    # Users far from everyone else's consensus (judged by reward models fitted without them) are left out, and the
    # share cap recomputed over the rest (alignd.trainer.safeguards).
    screened, scores = screen_users(stack, data.users, config, truncated=data.truncated_replies, seed=config.seed)
    leave_out_flagged(data, screened, config.data.max_user_share)
    if distributed.is_main():
        record_scores(job.database_url, job.run_id, scores, config.data.flag_p_value, screened.trust)
    reporter.report("reward_model", PHASE_START["reward_model"], {"users": screened.report})
    split = split_for_judge(data.train_pairs, data.train_labels, config.data.judge_fraction)  # without them
    _check_objective_signal(config.objective, split, data)
    rm = train_reward_model(stack, split.reward_groups, config.reward, config.lora, labels=split.reward_labels,
                            heldout=data.heldout_pairs, seed=config.seed, truncated=data.truncated_replies,
                            heldout_labels=data.heldout_labels, warm_start=job.previous_reward_model,
                            confidence=config.reward.confidence or 0.95)  # reported even when not checked
    by_kind = {kind: heldout_figures(stack, groups, labels, config.reward, config.reward.confidence or 0.95,
                                     data.truncated_replies) for kind, (groups, labels) in data.heldout_by_kind.items()}
    seconds["reward_model"] = time.monotonic() - tick
    _check_reward_model(rm, config.reward.confidence if config.objective in OPTIMIZES_REWARD_MODEL else 0.0, stack,
                        run_dir, reporter, by_kind)

    # 2b. The gate's judge: a reward model cross-fitted on the other side of the split, continuing its own.
    tick = time.monotonic()
    judge = None
    if split.judge_has_signal:
        judge = train_reward_model(stack, split.judge_groups, config.reward, config.lora, labels=split.judge_labels,
                                   heldout=data.heldout_pairs, seed=config.seed + 1,
                                   truncated=data.truncated_replies, heldout_labels=data.heldout_labels,
                                   warm_start=previous_judge(job.previous_reward_model),
                                   confidence=config.reward.confidence or 0.95, role=JUDGE)
    seconds["judge"] = time.monotonic() - tick

    # 3. Normalise rewards over the reference policy's (the base's) replies.
    tick = time.monotonic()
    reporter.report("normalize", PHASE_START["normalize"], {"reward_model": _rm_figures(rm, by_kind)})
    remote = RemoteRollouts(link, run_dir) if link is not None else None  # rank 0's
    backend: RolloutBackend = distributed.shared_rollouts(remote)
    ppo_ids = _prompt_ids(stack, data.ppo_prompts or data.gate_prompts, config.ppo.max_prompt_tokens)
    gate_ids = _prompt_ids(stack, data.gate_prompts, config.ppo.max_prompt_tokens)
    sampling = Sampling(temperature=config.ppo.temperature, max_new_tokens=config.ppo.max_new_tokens)
    reference = backend.generate(stack, _sample(ppo_ids, config.reward.normalization_samples, rng), None, sampling)
    rm.normalization = fit_normalization(stack, reference)
    if judge is not None:
        judge.normalization = fit_normalization(stack, reference, role=JUDGE)
    if distributed.is_main():
        save_reward_model(stack, run_dir / "reward", rm)
        if judge is not None:
            save_reward_model(stack, run_dir / JUDGE_FOLDER, judge, role=JUDGE)
    seconds["normalize"] = time.monotonic() - tick
    reporter.report("ppo", PHASE_START["ppo"], {"reward_model": _rm_figures(rm, by_kind),
                                                "judge": None if judge is None else _rm_figures(judge)})

    # 4. Policy optimisation (PPO, or the run's objective) against the reward model, rollouts from the engine.
    tick = time.monotonic()
    history: list[dict[str, Any]] = []
    reporter.report("ppo", PHASE_START["ppo"], {"objective": config.objective})
    feedback = {"feedback": UserFeedback(split.reward_groups, split.reward_labels, data.truncated_replies)
                } if config.objective in TRAINS_ON_FEEDBACK else {}
    ppo = OPTIMIZERS[config.objective](stack, backend, ppo_ids, rm.normalization, config,
                                       on_iteration=_ppo_reporter(reporter, config.ppo.iterations, history),
                                       kl_coef=job.kl_coef, **feedback)
    seconds["ppo"] = time.monotonic() - tick
    main, gate_together = distributed.is_main(), not distributed.leaves_before_gate()
    if not gate_together:
        distributed.leave()  # the gate is rank 0's alone: the process group ends here
        if not main:
            return None
    # PPO's β carries over: the next run's controller starts where this one ended (None: nothing to carry).
    kl_coef = ppo.kl_coef if config.objective in CARRIES_KL_COEF else None
    reporter.report("gate", PHASE_START["gate"], {"kl_controller": {"kl_coef": kl_coef, "stopped": ppo.stopped}})

    # 5. Gate: candidate and current policy answer the same distinct held-out prompts with the same seeds, judged by
    # the cross-fitted judge; the implicit-reward check on held-out user pairs is reported beside it.
    tick = time.monotonic()
    parent = CURRENT if job.parent_adapter is not None else None
    rm_scorer = Scorer(REWARD, rm.normalization)
    judge_scorer = rm_scorer if judge is None else Scorer(JUDGE, judge.normalization)
    gate_prompts = _gate_prompts(gate_ids, ppo_ids, config.gate.n_prompts, config.gate.min_prompts, rng)
    evaluation = evaluate(stack, backend, gate_prompts, POLICY, parent, judge_scorer, config.gate, seed=config.seed,
                          reward_model=None if judge is None else rm_scorer)
    implicit = implicit_reward_check(stack, data.heldout_pairs, POLICY, parent, config.reward.max_prompt_tokens,
                                     config.reward.max_reply_tokens, config.gate.confidence, data.truncated_replies)
    if gate_together:  # fsdp: the gate's passes needed every rank's shards; the rest is rank 0's
        distributed.leave()
        if not main:
            return None
    decision = decide(evaluation, config.gate, "reward model" if judge is None else "cross-fitted judge", implicit,
                      seed=config.seed, heldout_prompts=min(config.gate.n_prompts, len(gate_ids)))
    staged = stack.save_adapter(POLICY, run_dir / "candidate")
    save_decision(staged, decision)
    seconds["gate"] = time.monotonic() - tick
    candidate, current = decision.candidate, decision.current
    figures = {"reward": candidate.mean_reward, "kl": candidate.kl, "eos_rate": candidate.eos_rate,
               "current_reward": current.mean_reward, "current_kl": current.kl,
               "gain": decision.gain, "gain_lower": decision.gain_lower, "gain_upper": decision.gain_upper,
               "reward_model_gain": decision.reward_model_gain, "implicit_reward_raised": implicit["raised"],
               "heldout_accuracy": rm.heldout_accuracy,
               "judge_heldout_accuracy": None if judge is None else judge.heldout_accuracy,
               "length_controlled_gain": decision.length_controlled_gain,
               "response_length": candidate.response_length, "current_response_length": current.response_length}
    reporter.report("register", PHASE_START["register"],
                    {"gate": decision.to_dict(), "seconds": {k: round(v, 2) for k, v in seconds.items()}})
    return RunResult(staged_adapter=str(staged), passed=decision.promote, reason=decision.reason, figures=figures,
                     new_pair_ids=data.new_pair_ids, new_label_ids=data.new_label_ids)


def _check_objective_signal(objective: str, split: JudgeSplit, data: TrainingData) -> None:
    """KTO trains on labels alone: stop before the reward model when the run has none to give it (the supervisor
    refuses such a run before it starts when the store holds no labels at all; this covers all of them being
    held out, on the judge's side or left out by the safeguards)."""
    if objective == "kto" and not split.reward_labels:
        raise NoTrainingData(f"kto trains on good/bad labels (thumbs, clear ratings) and none are outside the "
                             f"held-out and the judge's splits ({data.counts()}, {split.counts()})")


def _gate_prompts(heldout: list[list[int]], training: list[list[int]], most: int, least: int, rng: random.Random
                  ) -> list[list[int]]:
    """Distinct prompts for the gate: held-out ones (up to ``most``), topped up to ``least`` with PPO's own when too
    few are held out yet (a small deployment: one prompt in ten is held out), so that the paired test has prompts
    enough to conclude at all; the decision reports how many were held out."""
    chosen = rng.sample(heldout, min(most, len(heldout)))
    if len(chosen) < least:
        taken = {tuple(p) for p in chosen}
        rest = [p for p in training if tuple(p) not in taken]
        chosen += rng.sample(rest, min(least - len(chosen), len(rest)))
    return chosen


def _rm_figures(rm: Any, by_kind: dict[str, Any] | None = None) -> dict[str, Any]:
    out = asdict(rm)
    out["normalization"] = asdict(rm.normalization)
    if by_kind is not None:
        out["heldout_by_kind"] = by_kind
    return out


def _check_reward_model(rm: RewardFigures, confidence: float, stack: ModelStack, run_dir: Path, reporter: Reporter,
                        by_kind: dict[str, Any]) -> None:
    """Stop the run before PPO when the reward model is not shown to beat chance on held-out feedback."""
    reporter.report("reward_model", PHASE_START["normalize"], {"reward_model": _rm_figures(rm, by_kind)})
    if confidence <= 0:
        return
    low = rm.heldout_interval[0] if rm.heldout_interval is not None else 0.0
    if low > 0.5:
        return
    if distributed.is_main():
        save_reward_model(stack, run_dir / "reward", rm)  # the next run continues from what it learned
    held = rm.heldout_judgements
    if held == 0:
        raise RewardModelNotBetterThanChance(
            "the reward model could not be checked: no held-out feedback yet (one completion in ten is held out); "
            "collect more feedback, or set --reward-model-confidence 0 to train without the check")
    raise RewardModelNotBetterThanChance(
        f"the reward model is not better than chance on held-out feedback: accuracy {rm.heldout_accuracy:.2f} "
        f"on {held} held-out judgements, {confidence:.0%} interval {low:.2f}-{rm.heldout_interval[1]:.2f} "  # type: ignore[index]
        "includes 0.5; PPO would optimise noise, so the run stops here (the next run continues from this reward "
        "model with more feedback)")
