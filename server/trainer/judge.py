"""The gate's judge: a second reward model, fitted on feedback the PPO reward model never learns from.

PPO climbs its reward model's errors along with its signal, so that model's verdict on the candidate it produced is
biased in the candidate's favour. The judge is cross-fitted: a stable hash of each feedback event's prompt puts the
event on the judge's side (a share ``judge_fraction`` of prompts) or on the reward model's, the same in every run,
and each model continues from its own previous fit, so neither ever trains on the other's data, nor on the held-out
feedback both are measured on. Splitting by prompt, not by event, keeps one prompt's replies on one side: the judge
cannot have learned a prompt-specific quirk that PPO's reward model also learned.

Why not an ensemble of earlier runs' reward models: each run's reward model continues from the previous one and is
fitted on accumulated feedback, so they share most of their data and their errors. The cost of cross-fitting is the
judge's share of the pairs, which PPO's reward model no longer sees (docs/training.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alignd.store.records import Label
from alignd.trainer.data import is_heldout
from alignd.trainer.reward_model import PairGroup

__all__ = ["JUDGE", "JUDGE_FOLDER", "JudgeSplit", "previous_judge", "split_for_judge"]

JUDGE = "judge"
"""Adapter (and head) name of the judge in the trainer's stack."""

JUDGE_FOLDER = "judge"
"""Where a run saves its judge, beside its reward model (``<run>/reward``)."""


def _on_judge_side(prompt: Sequence[dict[str, str]], fraction: float) -> bool:
    # Salted, so that the judge's side is independent of the held-out split (which hashes completion ids and
    # prompts unsalted).
    return is_heldout("judge\0" + json.dumps(list(prompt), sort_keys=True), fraction)


@dataclass
class JudgeSplit:
    """A run's training signal split between the PPO reward model and the judge."""

    reward_groups: list[PairGroup]
    reward_labels: list[Label]
    judge_groups: list[PairGroup]
    judge_labels: list[Label]

    @property
    def judge_has_signal(self) -> bool:
        return bool(self.judge_groups or self.judge_labels)

    def counts(self) -> dict[str, int]:
        return {"judge_pairs": sum(map(len, self.judge_groups)), "judge_labels": len(self.judge_labels)}


def split_for_judge(groups: Sequence[PairGroup], labels: Sequence[Label], fraction: float) -> JudgeSplit:
    """Pairs and labels for the reward model and for the judge (``fraction`` 0: the judge gets nothing)."""
    return JudgeSplit(reward_groups=[g for g in groups if g and not _on_judge_side(g[0].prompt, fraction)],
                      reward_labels=[x for x in labels if not _on_judge_side(x.prompt, fraction)],
                      judge_groups=[g for g in groups if g and _on_judge_side(g[0].prompt, fraction)],
                      judge_labels=[x for x in labels if _on_judge_side(x.prompt, fraction)])


def previous_judge(previous_reward_model: str | None) -> Path | None:
    """The judge saved by the run whose reward model this run continues from (None if it saved none)."""
    if previous_reward_model is None:
        return None
    folder = Path(previous_reward_model).parent / JUDGE_FOLDER
    return folder if folder.is_dir() else None
