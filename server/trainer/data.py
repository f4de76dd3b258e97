"""Training data for one run, read from the store: preference pairs and labels, a held-out split, PPO prompts.

Selection rules:
- new signal is what no run has used yet (oldest first, up to a cap); a replay share of older signal is mixed in
  (all of it, up to the cap, when nothing is new);
- a stable hash of each feedback event's id decides whether it is held out, so a held-out event never trains in
  any run, and all pairs of one event (a ranking's) fall on the same side;
- prompts are the distinct request messages of recent completions (real user prompts); a stable hash of each
  prompt sets a share aside for the gate, so the gate judges on prompts PPO did not optimise on.
Truncation happens when prompts are tokenised (``encode_prompt`` keeps a prompt's last tokens; the reward model's
encoder cuts a long reply but keeps its closing EOS), never silently dropping a reply's end.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from alignd.messages import plain_messages
from alignd.store import Label, PreferencePair, Store
from alignd.trainer.config import DataConfig
from alignd.trainer.reward_model import PairGroup

__all__ = ["TrainingData", "is_heldout", "load_training_data"]


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (the same in every process and run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def is_heldout(key: str, fraction: float) -> bool:
    """Whether the event or prompt ``key`` belongs to the held-out side."""
    return _unit_hash(key) < fraction


@dataclass
class TrainingData:
    """What one run trains and evaluates on."""

    train_pairs: list[PairGroup]
    """Pairs to train on, grouped by feedback event."""
    heldout_pairs: list[PairGroup]
    """Pairs of held-out events: the reward model's accuracy is measured on them."""
    train_labels: list[Label]
    ppo_prompts: list[list[dict[str, str]]]
    """Distinct recent user prompts for rollouts."""
    gate_prompts: list[list[dict[str, str]]]
    """Distinct held-out prompts both policies answer at the gate."""
    new_pair_ids: list[int] = field(default_factory=list)
    """Rows of ``preference_pairs`` this run consumes (marked used when the run succeeds)."""
    new_label_ids: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"train_pairs": sum(map(len, self.train_pairs)), "heldout_pairs": sum(map(len, self.heldout_pairs)),
                "train_labels": len(self.train_labels), "new_pairs": len(self.new_pair_ids),
                "new_labels": len(self.new_label_ids), "ppo_prompts": len(self.ppo_prompts),
                "gate_prompts": len(self.gate_prompts)}


def _groups(rows: list[dict[str, Any]]) -> list[PairGroup]:
    """Stored pair rows as the one pair type, grouped by the feedback event that made them (in first-seen order)."""
    groups: dict[str, list[PreferencePair]] = {}
    for row in rows:
        groups.setdefault(row["feedback_id"], []).append(PreferencePair(
            prompt=plain_messages(row["prompt"]), chosen=row["chosen"], rejected=row["rejected"],
            margin=float(row["margin"]), weight=float(row["weight"]), chosen_choice=row.get("chosen_choice"),
            rejected_choice=row.get("rejected_choice")))
    return list(groups.values())


def _label(row: dict[str, Any]) -> Label:
    return Label(prompt=plain_messages(row["prompt"]), reply=row["reply"], good=bool(row["good"]),
                 weight=float(row["weight"]), choice=row.get("choice"))


async def _signal(store: Store, table: str, cap: int, config: DataConfig, rng: random.Random
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """``(train rows, held-out rows, new row ids)`` of one signal table."""
    new = await store.signal_rows(table, used=False, limit=cap)
    old = await store.signal_rows(table, used=True, limit=max(cap, 1))
    def held_out(row: dict[str, Any]) -> bool:
        return is_heldout(row["feedback_id"], config.heldout_fraction)

    held = [r for r in new + old if held_out(r)]
    train_new = [r for r in new if not held_out(r)]
    train_old = [r for r in old if not held_out(r)]
    # A share of older signal, or all of it when nothing is new (an operator asked for a run anyway).
    share = round(config.replay_fraction * len(train_new)) if train_new else len(train_old)
    replay = rng.sample(train_old, min(len(train_old), share))
    return train_new + replay, held, [r["id"] for r in new]


async def _prompts(store: Store, config: DataConfig) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    seen: dict[str, list[dict[str, str]]] = {}
    for messages in await store.recent_prompts(config.max_prompts * 4):
        plain = plain_messages(messages)
        key = json.dumps(plain, sort_keys=True)
        if key not in seen:
            seen[key] = plain
        if len(seen) >= config.max_prompts:
            break
    ppo = [m for k, m in seen.items() if not is_heldout(k, config.heldout_fraction)]
    gate = [m for k, m in seen.items() if is_heldout(k, config.heldout_fraction)]
    return ppo, gate


async def load_training_data(store: Store, config: DataConfig, seed: int = 0) -> TrainingData:
    """Select a run's pairs, labels and prompts from the store (see the module docstring for the rules)."""
    rng = random.Random(seed)
    pairs, heldout_pairs, pair_ids = await _signal(store, "preference_pairs", config.max_pairs, config, rng)
    labels, _, label_ids = await _signal(store, "labels", config.max_labels, config, rng)
    ppo_prompts, gate_prompts = await _prompts(store, config)
    return TrainingData(train_pairs=_groups(pairs), heldout_pairs=_groups(heldout_pairs),
                        train_labels=[_label(r) for r in labels], ppo_prompts=ppo_prompts, gate_prompts=gate_prompts,
                        new_pair_ids=pair_ids, new_label_ids=label_ids)
