"""The reward model on the tiny demo model: a planted preference is learnt, saved, reloaded and normalised."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import pytest
import torch

from alignd.demo.corpus import generate_corpus, training_prompts
from alignd.store.records import Label, PreferencePair
from alignd.trainer.config import AdapterConfig, RewardConfig
from alignd.trainer.models import ModelStack
from alignd.trainer.reward_model import (
    MANIFEST,
    PairGroup,
    RewardFigures,
    _collate,
    _pack,
    _units,
    evaluate_pairs,
    fit_normalization,
    heldout_figures,
    load_reward_model,
    save_reward_model,
    score_rollouts,
    train_reward_model,
    wilson_interval,
)
from alignd.trainer.rollout import HFRollouts, Sampling, collate_rollouts, encode_prompt

# The planted rule: enthusiastic beats friendly beats formal beats concise, whatever the prompt.
RANKING = ("enthusiastic", "friendly", "formal", "concise")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared two-core machine run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def replies_by_prompt(n_dialogues: int, seed: int) -> dict[str, dict[str, str]]:
    """Corpus replies grouped by prompt, then by style (each drawn prompt is answered once in every style)."""
    grouped: dict[str, dict[str, str]] = {}
    for dialogue in generate_corpus(n_dialogues, seed=seed):
        grouped.setdefault(dialogue.prompt, {})[dialogue.style] = dialogue.reply
    return grouped


def ranking_pairs(grouped: dict[str, dict[str, str]]) -> list[PairGroup]:
    """Every prompt's replies ranked by the rule: all C(K,2) pairs, each weighing 1/C(K,2), one group per prompt."""
    groups = []
    for prompt, replies in grouped.items():
        ranked = [style for style in RANKING if style in replies]
        weight = 1 / max(1, len(ranked) * (len(ranked) - 1) // 2)
        groups.append([
            PreferencePair(prompt=[{"role": "user", "content": prompt}], chosen=replies[a], rejected=replies[b],
                           weight=weight)
            for a, b in combinations(ranked, 2)
        ])
    return groups


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path) -> ModelStack:
    return ModelStack.load(tiny_model_dir, AdapterConfig(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def trained(stack: ModelStack) -> RewardFigures:
    """A reward model fitted on the planted ranking (held-out prompts split off by group), plus a few labels."""
    grouped = replies_by_prompt(400, seed=5)
    labels = [
        Label(prompt=[{"role": "user", "content": prompt}], reply=replies[style], good=style == "enthusiastic")
        for prompt, replies in list(grouped.items())[:20]
        for style in ("enthusiastic", "concise")
        if style in replies
    ]
    config = RewardConfig(epochs=2, heldout_fraction=0.25)
    return train_reward_model(stack, ranking_pairs(grouped), config, AdapterConfig(), labels=labels, seed=0)


def test_planted_preference_reaches_90_percent_heldout_accuracy(trained: RewardFigures) -> None:
    assert trained.heldout_pairs >= 100 and trained.train_pairs >= 300 and trained.labels == 40
    assert trained.heldout_accuracy is not None and trained.heldout_accuracy >= 0.9, trained
    assert trained.heldout_loss is not None and trained.heldout_loss < 0.3


def test_unseen_corpus_draw_is_ranked_too(stack: ModelStack, trained: RewardFigures) -> None:
    accuracy, _ = evaluate_pairs(stack, ranking_pairs(replies_by_prompt(80, seed=99)), RewardConfig())
    assert accuracy >= 0.9


def test_save_and_load_reproduce_scores(stack: ModelStack, trained: RewardFigures, tiny_model_dir: Path,
                                        tmp_path: Path) -> None:
    folder = save_reward_model(stack, tmp_path / "reward", trained)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "head.safetensors", MANIFEST
    ]  # safetensors and JSON only: nothing pickled
    fresh = ModelStack.load(tiny_model_dir, AdapterConfig(r=4), torch.device("cpu"), torch.float32)
    figures = load_reward_model(fresh, folder)
    assert figures == trained
    pairs = ranking_pairs(replies_by_prompt(8, seed=3))
    assert evaluate_pairs(fresh, pairs, RewardConfig()) == pytest.approx(evaluate_pairs(stack, pairs, RewardConfig()))


def test_rewards_are_normalised_over_reference_replies(stack: ModelStack, trained: RewardFigures) -> None:
    prompts = [encode_prompt(stack.tokenizer, [{"role": "user", "content": p.text}], 64)
               for p in training_prompts(24, seed=4)]
    torch.manual_seed(0)
    reference = HFRollouts().generate(stack, prompts, None, Sampling(temperature=1.0, max_new_tokens=24))
    normalization = fit_normalization(stack, reference)
    assert normalization.std > 0
    sequences, attention_mask, _ = collate_rollouts(reference, stack.tokenizer.pad_token_id, stack.device)
    scores = score_rollouts(stack, sequences, attention_mask, normalization)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)


def test_unpaired_labels_alone_teach_the_rule(stack: ModelStack) -> None:
    grouped = replies_by_prompt(240, seed=11)
    rng = random.Random(0)
    labels = []
    for prompt, replies in grouped.items():
        style = rng.choice(sorted(replies))
        labels.append(Label(prompt=[{"role": "user", "content": prompt}], reply=replies[style],
                            good=style == RANKING[0]))
    figures = train_reward_model(stack, [], RewardConfig(epochs=2), AdapterConfig(), labels=labels, heldout=[])
    assert figures.labels == len(labels) and figures.heldout_accuracy is None
    unseen = replies_by_prompt(80, seed=12)
    enthusiastic = {replies[RANKING[0]] for replies in unseen.values() if RANKING[0] in replies}
    heldout = [[pair] for group in ranking_pairs(unseen) for pair in group
               if pair.chosen in enthusiastic]  # the labelled rule only
    accuracy, _ = evaluate_pairs(stack, heldout, RewardConfig())
    assert accuracy >= 0.9


def test_a_ranking_shares_one_batch_and_each_reply_is_scored_once() -> None:
    prompt = [{"role": "user", "content": "q"}]
    ranking = [PreferencePair(prompt=prompt, chosen=a, rejected=b, weight=1 / 6) for a, b in combinations("wxyz", 2)]
    singles = [PreferencePair(prompt=prompt, chosen="s", rejected="t"),
               PreferencePair(prompt=prompt, chosen="u", rejected="v")]
    labels = [Label(prompt=prompt, reply="w", good=True)]
    batches = _pack(_units([[singles[0]], ranking, [singles[1]]], labels), batch_size=4)
    assert batches == [[[singles[0]], ranking], [[singles[1]], labels[0]]]  # the ranking travels whole, overflowing

    def encoder(_prompt: list[dict[str, str]], reply: str) -> tuple[int, ...]:
        return (10, ord(reply))

    batch = _collate(batches[0], encoder, pad_id=0, device=torch.device("cpu"))  # type: ignore[arg-type]
    assert batch.sequences.shape == (6, 2)  # s, t, w, x, y, z: each reply once
    assert len(batch.chosen) == 7 and batch.weight.tolist()[1:] == pytest.approx([1 / 6] * 6)
    rows = {chr(int(code)): i for i, (_, code) in enumerate(batch.sequences.tolist())}
    assert batch.chosen[1:].tolist() == [rows[a] for a, _ in combinations("wxyz", 2)]
    assert batch.rejected[1:].tolist() == [rows[b] for _, b in combinations("wxyz", 2)]


def test_wilson_interval_is_honest_for_small_samples() -> None:
    low, high = wilson_interval(9, 10, 0.95)
    assert low == pytest.approx(0.5958, abs=1e-3) and high == pytest.approx(0.9821, abs=1e-3)  # textbook values
    assert wilson_interval(6, 10, 0.95)[0] < 0.5  # 60% of 10 is not evidence against chance
    assert wilson_interval(60, 100, 0.95)[0] > 0.5  # 60% of 100 is
    assert wilson_interval(0, 0, 0.95) == (0.0, 1.0)
    assert wilson_interval(5, 5, 0.95)[1] == pytest.approx(1.0)


def test_heldout_figures_count_pairs_and_labels(stack: ModelStack, trained: RewardFigures) -> None:
    grouped = replies_by_prompt(60, seed=21)
    labels = [Label(prompt=[{"role": "user", "content": p}], reply=r[RANKING[0]], good=True)
              for p, r in grouped.items() if RANKING[0] in r]
    figures = heldout_figures(stack, ranking_pairs(grouped), labels, RewardConfig(), 0.95)
    assert figures["n"] == len(ranking_pairs(grouped)) + len(labels)  # a ranking is one judgement, not C(K,2)
    assert figures["accuracy"] >= 0.9 and figures["interval"][0] > 0.5


def test_a_run_continues_from_the_previous_reward_model(stack: ModelStack, trained: RewardFigures,
                                                         tiny_model_dir: Path, tmp_path: Path) -> None:
    """Warm start: a later fit on a handful of new pairs keeps what the saved model knew (a fresh one on those few
    pairs does not know the rule), and says where it started from."""
    folder = save_reward_model(stack, tmp_path / "reward", trained)
    few = ranking_pairs(replies_by_prompt(6, seed=31))[:2]
    unseen = ranking_pairs(replies_by_prompt(80, seed=32))
    later = ModelStack.load(tiny_model_dir, AdapterConfig(), torch.device("cpu"), torch.float32)
    figures = train_reward_model(later, few, RewardConfig(epochs=1), AdapterConfig(), heldout=unseen,
                                 warm_start=folder)
    assert figures.warm_start == str(folder) and figures.heldout_accuracy >= 0.85
    fresh = ModelStack.load(tiny_model_dir, AdapterConfig(), torch.device("cpu"), torch.float32)
    cold = train_reward_model(fresh, few, RewardConfig(epochs=1), AdapterConfig(), heldout=unseen)
    assert cold.warm_start is None and cold.heldout_accuracy < figures.heldout_accuracy
    other_rank = train_reward_model(fresh, few, RewardConfig(epochs=1), AdapterConfig(r=4), heldout=unseen,
                                    warm_start=folder)
    assert other_rank.warm_start is None  # another shape: a fresh model, not a crash


def test_a_warm_start_needs_the_same_base_model(stack: ModelStack, trained: RewardFigures, tmp_path: Path) -> None:
    """A reward model saved on another base (the operator changed --model) is not continued: a fresh one is fitted
    instead of the run failing on mismatched shapes."""
    import json

    folder = save_reward_model(stack, tmp_path / "reward", trained)
    assert json.loads((folder / MANIFEST).read_text())["base_model"] == stack.base_dir
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "base_model": "/some/other/model"}))
    few = ranking_pairs(replies_by_prompt(6, seed=31))[:2]
    figures = train_reward_model(stack, few, RewardConfig(epochs=1), AdapterConfig(), heldout=[], warm_start=folder)
    assert figures.warm_start is None
