"""The implicit-reward check: does the candidate favour the replies users chose, more than its parent did?

For a policy π, ``log π(chosen) − log π(rejected)`` is how much more likely it makes the user's chosen reply than the
rejected one (DPO's implicit reward, up to β and the reference). On held-out user pairs the check counts how often the
candidate raises that log-ratio above its parent's. It needs no reward model, so it cannot be gamed by PPO's: a share
well above one half says the policy moved towards what these users chose, one well below says it moved away.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from alignd.trainer.models import ModelStack
from alignd.trainer.reward_model import PairGroup, wilson_interval
from alignd.trainer.rollout import Rollout, collate_rollouts, encode_prompt, policy_logprobs

__all__ = ["implicit_reward_check", "reply_logprobs"]


@torch.no_grad()
def reply_logprobs(stack: ModelStack, rollouts: Sequence[Rollout], adapter: str | None, chunk: int = 16) -> Tensor:
    """Each reply's summed log-probability under ``adapter`` (None: the base) at temperature 1, (B,)."""
    parts = []
    for start in range(0, len(rollouts), chunk):
        rows = rollouts[start : start + chunk]
        sequences, attention_mask, action_mask = collate_rollouts(rows, stack.tokenizer.pad_token_id, stack.device)
        with stack.use(adapter):
            logprobs = policy_logprobs(stack, sequences, attention_mask, action_mask.shape[1], 1.0)  # (b, R)
        parts.append((logprobs.float() * action_mask).sum(-1))  # (b,)
    return torch.cat(parts).cpu()  # (B,)


def implicit_reward_check(stack: ModelStack, groups: Sequence[PairGroup], candidate: str, parent: str | None,
                          max_prompt_tokens: int, max_reply_tokens: int, confidence: float,
                          truncated: Collection[str] = ()) -> dict[str, Any]:
    """``{"raised", "n", "interval"}``: the share of held-out judgements (a ranking's pairs are one judgement, counted
    as the share of its pairs) on which the candidate's chosen-vs-rejected log-ratio exceeds its parent's, and its
    Wilson interval at ``confidence``; ``raised`` is None with no held-out pairs."""
    groups = [g for g in groups if g]
    if not groups:
        return {"raised": None, "n": 0, "interval": None}
    tokenizer, eos = stack.tokenizer, stack.tokenizer.eos_token_id
    index: dict[tuple[int, ...], int] = {}  # (prompt ids + reply ids) -> row: each reply is scored once
    rollouts: list[Rollout] = []

    def row(prompt: list[dict[str, Any]], reply: str) -> int:
        prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_tokens)
        reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        finished = reply not in truncated and len(reply_ids) <= max_reply_tokens
        response = [*reply_ids[:max_reply_tokens], *([eos] if finished else [])] or [eos]
        key = (*prompt_ids, -1, *response)
        if key not in index:
            index[key] = len(rollouts)
            rollouts.append(Rollout(prompt_ids=prompt_ids, response_ids=response, ended=finished))
        return index[key]

    rows = [[(row(p.prompt, p.chosen), row(p.prompt, p.rejected)) for p in group] for group in groups]
    shift = reply_logprobs(stack, rollouts, candidate) - reply_logprobs(stack, rollouts, parent)  # (N,)
    raised = sum(sum(float(shift[c] > shift[r]) for c, r in group) / len(group) for group in rows)
    n = len(rows)
    return {"raised": raised / n, "n": n, "interval": wilson_interval(raised, n, confidence)}
