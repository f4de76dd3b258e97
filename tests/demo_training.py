"""The demo model with a reward model for "friendly" replies, for the objectives' short runs on it
(tests/test_trainer_critic_free.py, tests/test_trainer_preference.py): the fixture, prompts and the style measure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from alignd.demo.corpus import classify, generate_corpus, training_prompts
from alignd.store.records import PreferencePair
from alignd.trainer.config import RewardConfig, TrainerConfig
from alignd.trainer.models import POLICY, ModelStack, load_stack
from alignd.trainer.reward_model import RewardNormalization, fit_normalization, train_reward_model
from alignd.trainer.rollout import HFRollouts, Sampling, encode_prompt

MAX_NEW_TOKENS = 96

Friendly = tuple[ModelStack, RewardNormalization, dict[str, torch.Tensor]]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def prompt_ids(stack: ModelStack, texts: list[str]) -> list[list[int]]:
    return [encode_prompt(stack.tokenizer, user(text), 128) for text in texts]


def friendly_pairs(n_dialogues: int = 1200, seed: int = 5) -> list[list[PreferencePair]]:
    """One pair per corpus prompt and other style: its friendly reply over its formal or enthusiastic one."""
    grouped: dict[str, dict[str, str]] = {}
    for dialogue in generate_corpus(n_dialogues, seed=seed):
        grouped.setdefault(dialogue.prompt, {})[dialogue.style] = dialogue.reply
    return [[PreferencePair(prompt=user(p), chosen=r["friendly"], rejected=r[other])]
            for p, r in grouped.items() if "friendly" in r for other in ("formal", "enthusiastic") if other in r]


@pytest.fixture(scope="module")
def friendly(demo_model_dir: Path) -> Friendly:
    """The demo model with a reward model for "friendly over formal and enthusiastic" (a preference unrelated to
    length), its normalisation, and the fresh policy adapter's state (each test starts from it)."""
    stack = load_stack(demo_model_dir, TrainerConfig(device="cpu", dtype="float32"))
    figures = train_reward_model(stack, friendly_pairs(), RewardConfig(epochs=2), TrainerConfig().lora)
    assert figures.heldout_accuracy is not None and figures.heldout_accuracy >= 0.8, figures
    torch.manual_seed(1)
    reference = HFRollouts().generate(stack, prompt_ids(stack, [p.text for p in training_prompts(64, seed=1)]),
                                      None, Sampling(1.0, MAX_NEW_TOKENS))
    return stack, fit_normalization(stack, reference), stack.adapter_state(POLICY)


def friendly_share(stack: ModelStack, prompts: list[list[int]], adapter: str | None) -> float:
    """Share of ``adapter``'s replies to ``prompts`` (the same seed each time) that the corpus classifier calls
    friendly."""
    torch.manual_seed(7)
    replies = HFRollouts().generate(stack, prompts, adapter, Sampling(1.0, MAX_NEW_TOKENS))
    texts = [stack.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in replies]
    return sum(classify(t).style == "friendly" for t in texts) / len(texts)
