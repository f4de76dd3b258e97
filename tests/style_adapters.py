"""Policies that differ on the demo model's style axis, for tests of the gate and the live test: preference pairs
for the planted ranking, and a policy adapter moved towards one style by supervised steps (no reward model)."""

from __future__ import annotations

from itertools import combinations

import torch

from alignd.demo.corpus import generate_corpus
from alignd.store.records import PreferencePair
from alignd.trainer.models import POLICY, ModelStack
from alignd.trainer.reward_model import PairGroup
from alignd.trainer.rollout import Rollout, collate_rollouts, encode_prompt, policy_logprobs

RANKING = ("enthusiastic", "friendly", "formal", "concise")
"""The planted preference, best first."""


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def ranking_pairs(n_dialogues: int, seed: int) -> list[PairGroup]:
    """One ranking event per prompt of the corpus sample: its replies ordered by :data:`RANKING`."""
    grouped: dict[str, dict[str, str]] = {}
    for dialogue in generate_corpus(n_dialogues, seed=seed):
        grouped.setdefault(dialogue.prompt, {})[dialogue.style] = dialogue.reply
    groups = []
    for prompt, replies in grouped.items():
        ranked = [style for style in RANKING if style in replies]
        weight = 1 / max(1, len(ranked) * (len(ranked) - 1) // 2)
        groups.append([PreferencePair(prompt=user(prompt), chosen=replies[a], rejected=replies[b], weight=weight)
                       for a, b in combinations(ranked, 2)])
    return groups


def fine_tune_towards(stack: ModelStack, style: str, steps: int) -> None:
    """Supervised steps of the policy adapter on the corpus's replies in ``style``: a candidate clearly better
    under the planted ranking, made without the reward models the gate uses."""
    tokenizer = stack.tokenizer
    examples = [Rollout(encode_prompt(tokenizer, user(d.prompt), 128),
                        [*tokenizer.encode(d.reply, add_special_tokens=False), tokenizer.eos_token_id], True)
                for d in generate_corpus(400, seed=11) if d.style == style]
    params = stack.role_parameters(POLICY)
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = [examples[i] for i in torch.randint(len(examples), (8,), generator=generator).tolist()]
        sequences, attention_mask, action_mask = collate_rollouts(batch, tokenizer.pad_token_id, stack.device)
        with stack.use(POLICY):
            logprobs = policy_logprobs(stack, sequences, attention_mask, action_mask.shape[1], 1.0)  # (8, R)
            loss = -(logprobs * action_mask).sum() / action_mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
