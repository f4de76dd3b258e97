"""GRPO and RLOO: their advantages, rewards and losses against hand-computed values, and a short run of each on the
demo model that moves its style axis the way the reward model prefers and passes the same gate as PPO."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict

import pytest
import torch

from alignd.demo.corpus import held_out_prompts, training_prompts
from alignd.trainer.config import CriticFreeConfig, GateConfig, PPOConfig, TrainerConfig
from alignd.trainer.critic_free import (
    CriticFreeStats,
    critic_free_loss,
    group_prompts,
    grpo_advantages,
    k3_kl,
    kl_penalized_scores,
    rloo_advantages,
    run_critic_free,
)
from alignd.trainer.gate import Scorer, decide, evaluate
from alignd.trainer.models import POLICY, REWARD
from alignd.trainer.rollout import HFRollouts
from tests.demo_training import (  # noqa: F401 (fixtures)
    MAX_NEW_TOKENS,
    Friendly,
    friendly,
    friendly_share,
    one_torch_thread,
    prompt_ids,
)

# --- hand-computed values -------------------------------------------------------------------------------------


def test_grpo_advantages_are_normalised_within_each_group() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of k = 3
    # group 1: mean 2, unbiased std 1; group 2: all alike, so no reply is better than another
    expected = torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    torch.testing.assert_close(grpo_advantages(rewards, 3), expected)
    # k = 2: mean 2, std sqrt(8)
    torch.testing.assert_close(grpo_advantages(torch.tensor([0.0, 4.0]), 2, eps=0.0),
                               torch.tensor([-2 / math.sqrt(8), 2 / math.sqrt(8)]))


def test_rloo_advantages_leave_each_reply_out_of_its_baseline() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 1.0, 2.0])
    # 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2; a flat group gives 0; a shifted group as the first
    expected = torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0, -1.5, 0.0, 1.5])
    torch.testing.assert_close(rloo_advantages(rewards, 3), expected)
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 4.0, 0.0, 0.0]), 2),
                               torch.tensor([-3.0, 3.0, 0.0, 0.0]))


def test_rloo_reward_subtracts_the_summed_log_ratio_over_the_reply_only() -> None:
    scores = torch.tensor([1.0, 0.5])
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -2.0, -2.0]])  # the padded position's gap (9) must not count
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: 1 - 0.1 · (0.5 - 1.0) = 1.05; row 1: 0.5 - 0.1 · 3 = 0.2
    torch.testing.assert_close(kl_penalized_scores(scores, logprobs, ref, mask, 0.1), torch.tensor([1.05, 0.2]))


def test_k3_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    half, quarter = math.log(0.5), math.log(0.25)
    out = k3_kl(torch.tensor([[half, half]]), torch.tensor([[quarter, half]]))
    # d = log 0.25 - log 0.5 = -ln 2: e^d - d - 1 = 0.5 + ln 2 - 1
    torch.testing.assert_close(out, torch.tensor([[0.5 + math.log(2) - 1, 0.0]]))


def test_the_loss_clips_the_ratio_masks_padding_and_adds_the_kl_term() -> None:
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = (old + torch.tensor([[math.log(1.5), 0.0, 5.0], [0.0, 0.0, 0.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([2.0, -1.0])
    loss, kl_term, stats = critic_free_loss(new, old, old, advantages, mask, clip_eps=0.2, kl_coef=0.0)
    # tokens: ratio 1.5 with A = 2 is clipped to 1.2: max(-3, -2.4) = -2.4; then -2 · 1; then +1 · 1; padding ignored
    assert loss.item() == pytest.approx((-2.4 - 2.0 + 1.0) / 3)
    assert stats.clip_fraction == pytest.approx(1 / 3)
    assert kl_term.item() == pytest.approx((math.exp(-math.log(1.5)) + math.log(1.5) - 1) / 3)
    loss.backward()
    assert new.grad is not None and new.grad[0, 0] == 0 and new.grad[0, 2] == 0 and new.grad[1, 1:].abs().sum() == 0
    assert new.grad[0, 1] == pytest.approx(-2 / 3) and new.grad[1, 0] == pytest.approx(1 / 3)
    with_kl, _, _ = critic_free_loss(new, old, old, advantages, mask, clip_eps=0.2, kl_coef=0.5)
    assert with_kl.item() == pytest.approx(loss.item() + 0.5 * kl_term.item())


def test_a_group_whose_replies_scored_alike_contributes_no_policy_gradient() -> None:
    old = torch.log(torch.full((4, 2), 0.3))
    new = old.clone().requires_grad_()
    advantages = grpo_advantages(torch.tensor([0.7, 0.7, -1.0, 2.0]), 2)  # group 1 flat
    loss, _, _ = critic_free_loss(new, old, old, advantages, torch.ones(4, 2), clip_eps=0.2, kl_coef=0.1)
    loss.backward()
    assert new.grad is not None and new.grad[:2].abs().sum() == 0 and new.grad[2:].abs().sum() > 0


def test_groups_keep_their_replies_adjacent() -> None:
    prompts = [[1], [2], [3], [4]]
    grouped = group_prompts(prompts, 3, 2, random.Random(0))
    assert len(grouped) == 6 and all(grouped[i] == grouped[i + 1] for i in (0, 2, 4))
    assert len({tuple(p) for p in grouped}) == 3  # distinct prompts when there are enough


# --- on the demo model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["grpo", "rloo"])
def test_a_short_run_moves_the_style_and_passes_the_gate(
    objective: str, friendly: Friendly  # noqa: F811 (the fixture)
) -> None:
    """Six iterations of 8 prompts × 4 replies: the friendly share of the policy's replies to held-out prompts rises,
    and the gate (its default confidence, margin and KL budget; the reward model as judge) promotes the policy."""
    stack, normalization, fresh = friendly
    stack.load_adapter_state(POLICY, fresh)
    config = TrainerConfig(objective=objective,  # type: ignore[arg-type]
                           ppo=PPOConfig(iterations=6, rollout_batch_size=32, max_new_tokens=MAX_NEW_TOKENS, epochs=2,
                                         minibatch_size=8, rollout_backend="hf"),
                           critic_free=CriticFreeConfig(samples_per_prompt=4),
                           gate=GateConfig(max_new_tokens=MAX_NEW_TOKENS), device="cpu", dtype="float32")
    heldout = prompt_ids(stack, [p.text for p in held_out_prompts(64, seed=3)])
    before = friendly_share(stack, heldout, None)
    started = time.monotonic()
    seen: list[CriticFreeStats] = []
    result = run_critic_free(stack, HFRollouts(), prompt_ids(stack, [p.text for p in training_prompts(200, seed=1)]),
                             normalization, config, on_iteration=seen.append)  # type: ignore[arg-type]
    after = friendly_share(stack, heldout, POLICY)
    evaluation = evaluate(stack, HFRollouts(), heldout, POLICY, None, Scorer(REWARD, normalization), config.gate,
                          seed=3)
    decision = decide(evaluation, config.gate)
    print(f"{objective}: friendly share {before:.2f} -> {after:.2f}; {time.monotonic() - started:.0f} s; "
          f"rewards {[round(h.reward, 2) for h in result.history]}; kl {[round(h.kl, 2) for h in result.history]}; "
          f"gate {decision.reason}")

    assert result.stopped is None and len(result.history) == 6 and seen == result.history
    for stats in result.history:
        figures = asdict(stats)
        assert stats.objective == objective and stats.samples_per_prompt == 4
        assert figures["value_loss"] is None and figures["explained_variance"] is None  # no critic
        assert all(math.isfinite(v) for v in figures.values() if isinstance(v, float)), figures
    assert result.history[0].kl == pytest.approx(0.0, abs=1e-4)  # the first rollouts come from the untouched policy
    assert after >= before + 0.15, (before, after)
    assert decision.promote, decision.reason
    assert decision.candidate.mean_reward > decision.current.mean_reward
    assert 0 < decision.candidate.kl <= GateConfig().kl_budget
