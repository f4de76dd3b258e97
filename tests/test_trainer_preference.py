"""Online DPO and KTO: their losses, the pair selection, KTO's reference point and class weights against
hand-computed values, and a short run of each on the demo model that moves its style axis the way users prefer and
passes the same default gate as PPO."""

from __future__ import annotations

import math
import multiprocessing
import random
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from alignd.demo.corpus import generate_corpus, held_out_prompts, training_prompts
from alignd.store import Label
from alignd.trainer.config import GateConfig, KTOConfig, OnlineDPOConfig, PPOConfig, TrainerConfig
from alignd.trainer.distributed import free_port
from alignd.trainer.feedback_sequences import UserFeedback, reply_rollout, summed_logprobs, weighted_draw
from alignd.trainer.gate import Scorer, decide, evaluate
from alignd.trainer.kto import KTOStats, class_weights, kto_loss, mismatched, reference_point, run_kto
from alignd.trainer.models import POLICY, REWARD
from alignd.trainer.online_dpo import OnlineDPOStats, dpo_loss, run_online_dpo, select_pairs
from alignd.trainer.ppo import PPOResult
from alignd.trainer.rollout import HFRollouts
from alignd.trainer.run import OPTIMIZERS
from tests.demo_training import (  # noqa: F401 (fixtures)
    MAX_NEW_TOKENS,
    Friendly,
    friendly,
    friendly_pairs,
    friendly_share,
    one_torch_thread,
    prompt_ids,
    user,
)
from tests.preference_steps import steps

# --- hand-computed values -------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_the_dpo_loss_is_the_sigmoid_of_the_implicit_reward_margin() -> None:
    chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0])
    loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref, ref, beta=0.5)
    # implicit rewards 0.5 · (π − ref): chosen (0.5, 0), rejected (−0.5, 0.5); margins (1, −0.5)
    torch.testing.assert_close(r_chosen, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(r_rejected, torch.tensor([-0.5, 0.5]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2)
    loss.backward()
    # d/dπ_chosen of −log σ(m) / 2 = −(1 − σ(m)) · β / 2; the rejected side the opposite
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad[0].item() == pytest.approx(-(1 - sigmoid(1.0)) * 0.25)
    assert rejected.grad[1].item() == pytest.approx((1 - sigmoid(-0.5)) * 0.25)
    assert not r_chosen.requires_grad and not r_rejected.requires_grad


def test_pairs_are_each_groups_best_and_worst_unless_the_reward_model_cannot_tell_them_apart() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.32, 0.3, 2.0, -1.0, 2.0])  # three groups of k = 3
    chosen, rejected = select_pairs(scores, 3, min_gap=0.05)
    # group 0: best row 1, worst row 0; group 1 within 0.05: no pair; group 2: the first of the equal best (row 6)
    assert chosen.tolist() == [1, 6] and rejected.tolist() == [0, 7]
    chosen, rejected = select_pairs(scores, 3, min_gap=0.0)
    assert chosen.tolist() == [1, 4, 6] and rejected.tolist() == [0, 3, 7]
    assert select_pairs(torch.tensor([1.0, 1.0]), 2, 0.0)[0].tolist() == [0]  # gap 0 ≥ 0: a pair of equals


def test_summed_logprobs_leave_padding_out() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(summed_logprobs(logprobs, mask), torch.tensor([-3.0, -1.5]))


def test_the_kto_reference_point_is_the_mean_mismatched_log_ratio_clamped_and_detached() -> None:
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    z0 = reference_point(policy, torch.tensor([-3.0, -2.0]))
    assert z0.item() == pytest.approx(1.5) and not z0.requires_grad  # mean of 2 and 1
    assert reference_point(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])).item() == 0.0  # mean 0
    assert reference_point(torch.tensor([-5.0]), torch.tensor([-2.0])).item() == 0.0  # −3, clamped
    assert mismatched(3).tolist() == [1, 2, 0]


def test_the_kto_loss_weighs_desirable_and_undesirable_replies_against_the_reference_point() -> None:
    logps = torch.tensor([-1.0, -4.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0])
    z0 = torch.tensor(0.5)
    loss, rewards = kto_loss(logps, ref, torch.tensor([True, False]), z0, beta=2.0, desirable_weight=1.0,
                             undesirable_weight=0.5)
    # log-ratios (1, −2): desirable 1 · (1 − σ(2 · (1 − 0.5))), undesirable 0.5 · (1 − σ(2 · (0.5 + 2)))
    expected = ((1 - sigmoid(1.0)) + 0.5 * (1 - sigmoid(5.0))) / 2
    assert loss.item() == pytest.approx(expected)
    torch.testing.assert_close(rewards, torch.tensor([2.0, -4.0]))
    loss.backward()
    # raising a desirable reply's log-prob lowers the loss, raising an undesirable one's raises it
    assert logps.grad is not None and logps.grad[0] < 0 < logps.grad[1]
    assert logps.grad[0].item() == pytest.approx(-sigmoid(1.0) * (1 - sigmoid(1.0)) * 2.0 / 2)


def test_class_weights_balance_the_classes_unless_set() -> None:
    balanced = KTOConfig()
    assert class_weights(3.0, 1.0, balanced) == (pytest.approx(1 / 3), 1.0)  # λ_D · 3 = λ_U · 1
    assert class_weights(1.0, 4.0, balanced) == (1.0, pytest.approx(0.25))
    assert class_weights(0.0, 5.0, balanced) == (1.0, 1.0)  # one class only: nothing to balance
    assert class_weights(3.0, 1.0, KTOConfig(desirable_weight=2.0)) == (2.0, pytest.approx(6.0))
    assert class_weights(3.0, 1.0, KTOConfig(desirable_weight=1.0, undesirable_weight=1.33)) == (1.0, 1.33)


def test_weighted_draws_follow_the_weights() -> None:
    rng = random.Random(0)
    assert weighted_draw(["a", "b"], [0.0, 1.0], 20, rng) == ["b"] * 20
    draws = weighted_draw(["a", "b"], [1.0, 3.0], 4000, rng)
    assert draws.count("b") / len(draws) == pytest.approx(0.75, abs=0.03)
    assert weighted_draw([], [], 5, rng) == []


def test_a_judged_reply_ends_with_the_end_of_turn_token_unless_it_was_cut(demo_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    reply = "Sure, comets are icy bodies that grow tails near the sun."
    ids = tokenizer.encode(reply, add_special_tokens=False)
    finished = reply_rollout(tokenizer, user("Tell me about comets."), reply, 128, 256)
    assert finished.ended and finished.response_ids == [*ids, tokenizer.eos_token_id]
    served_cut = reply_rollout(tokenizer, user("Tell me about comets."), reply, 128, 256, truncated={reply})
    assert not served_cut.ended and served_cut.response_ids == ids
    cut_here = reply_rollout(tokenizer, user("Tell me about comets."), reply, 128, 3)
    assert not cut_here.ended and cut_here.response_ids == ids[:3]


def test_both_objectives_are_registered_for_the_run_and_the_benchmark() -> None:
    assert OPTIMIZERS["online-dpo"] is run_online_dpo and OPTIMIZERS["kto"] is run_kto


def test_two_ranks_take_the_steps_one_process_takes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--trainer-processes 2 on the CPU (gloo): each rank on its share of every minibatch, gradients summed, takes the
    online-DPO and the KTO step one process takes on the whole minibatch, from the same fixed inputs."""
    def run(world: int) -> dict[int, dict[str, torch.Tensor]]:
        out = tmp_path / str(world)
        out.mkdir()
        port, ctx = free_port(), multiprocessing.get_context("spawn")
        processes = [ctx.Process(target=steps, args=(rank, world, port, str(tiny_model_dir), str(out)))
                     for rank in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(300)
            assert process.exitcode == 0, f"rank exited with {process.exitcode}"
        return {rank: load_file(str(out / f"rank{rank}.safetensors")) for rank in range(world)}

    one, two = run(1)[0], run(2)
    assert set(one) == set(two[0]) == set(two[1])
    for name, value in one.items():
        assert (two[0][name] == two[1][name]).all(), f"{name}: the ranks disagree"
        assert (two[0][name] - value).abs().max() < 2e-5, name
    for objective in ("dpo", "kto"):  # the updates are real: the weights moved far more than the runs differ
        moved = max((one[f"{objective}/{k}"] - one[f"before/{objective}/{k}"]).abs().max().item()
                    for k in (n.split("/", 2)[2] for n in one if n.startswith(f"before/{objective}/")))
        assert moved > 1e-3, (objective, moved)
    figures = [(tmp_path / str(w) / "rank0.figures").read_text().split() for w in (1, 2)]
    for a, b in zip(*figures, strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-7)


# --- on the demo model ----------------------------------------------------------------------------------------


def friendly_labels(n_dialogues: int, seed: int) -> list[Label]:
    """Thumbs on corpus replies as a user who likes friendly replies gives them: up on friendly, down on the rest."""
    return [Label(prompt=user(d.prompt), reply=d.reply, good=d.style == "friendly")
            for d in generate_corpus(n_dialogues, seed=seed)]


def short_run(objective: str, friendly: Friendly, feedback: UserFeedback  # noqa: F811 (the fixture)
              ) -> tuple[float, float, PPOResult, list[object], object]:
    """Six iterations of ``objective`` from the fresh policy: the friendly share of held-out replies before and
    after, the result, the reported iterations and the default gate's decision (the reward model as judge)."""
    stack, normalization, fresh = friendly
    stack.load_adapter_state(POLICY, fresh)
    config = TrainerConfig(objective=objective,  # type: ignore[arg-type]
                           ppo=PPOConfig(iterations=6, rollout_batch_size=32, max_new_tokens=MAX_NEW_TOKENS, epochs=2,
                                         minibatch_size=8, rollout_backend="hf"),
                           online_dpo=OnlineDPOConfig(samples_per_prompt=4, user_pairs=8),
                           gate=GateConfig(max_new_tokens=MAX_NEW_TOKENS), device="cpu", dtype="float32")
    heldout = prompt_ids(stack, [p.text for p in held_out_prompts(64, seed=3)])
    before = friendly_share(stack, heldout, None)
    started, seen = time.monotonic(), []
    result = OPTIMIZERS[objective](stack, HFRollouts(), prompt_ids(stack, [p.text for p in training_prompts(200, 1)]),
                                   normalization, config, on_iteration=seen.append, feedback=feedback)
    after = friendly_share(stack, heldout, POLICY)
    evaluation = evaluate(stack, HFRollouts(), heldout, POLICY, None, Scorer(REWARD, normalization), config.gate,
                          seed=3)
    decision = decide(evaluation, config.gate)
    print(f"{objective}: friendly share {before:.2f} -> {after:.2f}; {time.monotonic() - started:.0f} s; "
          f"rewards {[round(h.reward, 2) for h in result.history]}; kl {[round(h.kl, 2) for h in result.history]}; "
          f"gate {decision.reason}")
    return before, after, result, seen, decision


def check_common(result: PPOResult, seen: list[object], before: float, after: float, decision: object) -> None:
    """What every objective's short run must show: six finite iterations reported as they happened, the first
    from the untouched policy, the style moved, and the gate's promotion within the KL budget."""
    assert result.stopped is None and len(result.history) == 6 and seen == result.history
    for stats in result.history:
        figures = asdict(stats)
        assert figures["value_loss"] is None and figures["explained_variance"] is None  # no critic
        assert all(math.isfinite(v) for v in figures.values() if isinstance(v, float)), figures
    assert result.history[0].kl == pytest.approx(0.0, abs=1e-4)
    assert result.history[-1].kl > 0
    assert after >= before + 0.15, (before, after)
    assert decision.promote, decision.reason  # type: ignore[attr-defined]
    assert decision.candidate.mean_reward > decision.current.mean_reward  # type: ignore[attr-defined]
    assert 0 < decision.candidate.kl <= GateConfig().kl_budget  # type: ignore[attr-defined]


def test_online_dpo_moves_the_style_and_passes_the_gate(friendly: Friendly) -> None:  # noqa: F811
    """Six iterations of 8 prompts × 4 replies (best and worst by the reward model) plus 8 users' pairs each."""
    feedback = UserFeedback(pairs=friendly_pairs(400, seed=9))
    before, after, result, seen, decision = short_run("online-dpo", friendly, feedback)
    check_common(result, seen, before, after, decision)
    history: list[OnlineDPOStats] = result.history  # type: ignore[assignment]
    assert all(h.objective == "online-dpo" and h.user_pairs == 8 and 0 < h.sampled_pairs <= 8 for h in history)
    assert all(h.kl_coef == OnlineDPOConfig().beta for h in history)
    assert history[-1].reward_margin > 0 and history[-1].preference_accuracy > 0.5
    assert history[-1].chosen_reward > history[-1].rejected_reward


def test_kto_moves_the_style_and_passes_the_gate(friendly: Friendly) -> None:  # noqa: F811
    """Six iterations of 32 thumbs (friendly up, the rest down; about one in four is up: λ_D = 1, λ_U below it),
    and 16 sampled replies per iteration to report reward and KL."""
    feedback = UserFeedback(labels=friendly_labels(400, seed=9))
    before, after, result, seen, decision = short_run("kto", friendly, feedback)
    check_common(result, seen, before, after, decision)
    history: list[KTOStats] = result.history  # type: ignore[assignment]
    good = sum(x.good for x in feedback.labels)
    bad = len(feedback.labels) - good
    assert good < bad  # the corpus's styles are balanced: one reply in four is friendly
    for h in history:
        assert h.objective == "kto" and h.samples == 32 and h.reference_point >= 0
        assert h.desirable_weight == 1.0 and h.undesirable_weight == pytest.approx(good / bad)
    assert history[-1].desirable_reward > history[-1].undesirable_reward


def test_kto_without_labels_is_refused() -> None:
    with pytest.raises(ValueError, match="labels"):
        run_kto(None, HFRollouts(), [], None, TrainerConfig(), feedback=UserFeedback(pairs=friendly_pairs(40, 1)))  # type: ignore[arg-type]
