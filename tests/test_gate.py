"""The promotion gate on the real vLLM engine and the demo model: paired, seeded samples judged by a cross-fitted
reward model, decided on the lower confidence bound of the gain.

A candidate identical to the current policy must be rejected in at least 19 of 20 seeded trials; a candidate clearly
better on the demo's style axis (its replies moved towards the style users rank first) must pass, and the
implicit-reward check on held-out user pairs must see it move towards the users' choices.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from alignd.demo.corpus import classify, held_out_prompts, training_prompts
from alignd.trainer.config import GateConfig, RewardConfig, TrainerConfig
from alignd.trainer.gate import Scorer, decide, evaluate
from alignd.trainer.implicit_reward import implicit_reward_check
from alignd.trainer.judge import JUDGE
from alignd.trainer.models import POLICY, REWARD, ModelStack, load_stack
from alignd.trainer.reward_model import fit_normalization, train_reward_model
from alignd.trainer.rollout import (
    Rollout,
    Sampling,
    VLLMRollouts,
    encode_prompt,
)
from tests.serverkit import LoopThread
from tests.style_adapters import RANKING, fine_tune_towards, ranking_pairs, user

CURRENT = "current"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def judged(demo_model_dir: Path, engine: Any, engine_loop: LoopThread, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Any]:
    """The demo model with PPO's reward model and a judge fitted on disjoint samples of the planted ranking, both
    normalised over the base's replies from the engine, and the engine as the rollout backend."""
    config = TrainerConfig(device="cpu", dtype="float32")
    stack = load_stack(demo_model_dir, config)
    rm = train_reward_model(stack, ranking_pairs(300, seed=5), RewardConfig(epochs=2), config.lora)
    judge = train_reward_model(stack, ranking_pairs(300, seed=9), RewardConfig(epochs=2), config.lora, role=JUDGE)
    assert (rm.heldout_accuracy or 0) >= 0.8 and (judge.heldout_accuracy or 0) >= 0.8, (rm, judge)
    backend = VLLMRollouts(engine, loop=engine_loop.loop, workdir=tmp_path_factory.mktemp("rollouts"))
    prompts = [encode_prompt(stack.tokenizer, user(p.text), 128) for p in training_prompts(64, seed=1)]
    reference = backend.generate(stack, prompts, None, Sampling(1.0, 48), seeds=list(range(64)))
    return {"stack": stack, "backend": backend, "config": config,
            "rm": Scorer(REWARD, fit_normalization(stack, reference)),
            "judge": Scorer(JUDGE, fit_normalization(stack, reference, role=JUDGE)),
            "prompts": [encode_prompt(stack.tokenizer, user(p.text), 128) for p in held_out_prompts(16, seed=2)]}


def test_a_candidate_identical_to_the_current_policy_is_rejected_in_19_of_20_seeded_trials(
        judged: dict[str, Any], tmp_path: Path) -> None:
    stack: ModelStack = judged["stack"]
    # The current policy: an adapter that is not the base (small random LoRA weights); the candidate: its copy.
    stack.add_adapter(CURRENT, judged["config"].lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in stack.model.named_parameters():
            if f".{CURRENT}." in name and "lora_B" in name:
                param.normal_(0, 0.02)
    stack.load_adapter(POLICY, stack.save_adapter(CURRENT, tmp_path / "current"))
    gate = GateConfig(n_prompts=16, samples_per_prompt=2, max_new_tokens=48)
    decisions = []
    for trial in range(20):
        evaluation = evaluate(stack, judged["backend"], judged["prompts"], POLICY, CURRENT, judged["judge"], gate,
                              seed=trial, reward_model=judged["rm"])
        decisions.append(decide(evaluation, gate, "cross-fitted judge", seed=trial))
    promoted = [d for d in decisions if d.promote]
    print("gains", [round(d.gain, 3) for d in decisions], "lower bounds", [round(d.gain_lower, 3) for d in decisions])
    assert len(promoted) <= 1, [d.reason for d in promoted]
    assert all(d.prompts == 16 and d.candidate.n == 32 for d in decisions)
    # Same seeds, same weights: the engine drew the same replies for both, so the paired differences vanish.
    assert sum(abs(d.gain) < 1e-6 for d in decisions) >= 19, [d.gain for d in decisions]


def test_a_clearly_better_candidate_passes_and_the_implicit_check_sees_it(judged: dict[str, Any]) -> None:
    stack: ModelStack = judged["stack"]
    stack.add_adapter(POLICY, judged["config"].lora)
    fine_tune_towards(stack, RANKING[0], steps=40)
    gate = GateConfig(n_prompts=16, samples_per_prompt=2, max_new_tokens=48)
    evaluation = evaluate(stack, judged["backend"], judged["prompts"], POLICY, None, judged["judge"], gate, seed=0,
                          reward_model=judged["rm"])
    implicit = implicit_reward_check(stack, ranking_pairs(120, seed=13), POLICY, None, 128, 128, 0.95)
    decision = decide(evaluation, gate, "cross-fitted judge", implicit)
    print(decision.reason, implicit)
    assert decision.promote, decision.reason
    assert decision.gain_lower is not None and decision.gain_lower > gate.margin
    assert decision.reward_model_gain is not None and decision.reward_model_gain > 0  # both models agree

    # What the judge saw is real: the candidate writes the top-ranked style far more often than the base.
    replies = judged["backend"].generate(stack, judged["prompts"] * 2, POLICY, Sampling(1.0, 48),
                                         seeds=list(range(32)))
    base = judged["backend"].generate(stack, judged["prompts"] * 2, None, Sampling(1.0, 48), seeds=list(range(32)))

    def share(rollouts: list[Rollout]) -> float:
        texts = [stack.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
        return sum(classify(t).style == RANKING[0] for t in texts) / len(texts)

    assert share(replies) >= share(base) + 0.3, (share(base), share(replies))
    # Without any reward model: on held-out user rankings the candidate favours the chosen reply more than the base.
    assert implicit["n"] > 20 and implicit["interval"][0] > 0.5, implicit
