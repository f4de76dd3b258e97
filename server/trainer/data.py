"""Training data for one run, read from the store: preference pairs and labels, a held-out split, PPO prompts.

Selection rules:
- a run learns from the accumulated signal: every pair and label no run has used yet (up to a cap), then the most
  recent older ones up to the same cap; each weighs less the older it is (``recency_half_life``), so the reward
  model neither forgets what came before a small new batch nor clings to old taste;
- a stable hash of each completion's id decides whether its feedback is held out, in every run: no reply is ever on
  both sides (a thumbs label cannot train on a held-out pair's reply), and a ranking's pairs stay together;
- replies that were cut at their length limit when served are known as truncated, so the reward model sees them as
  truncated (no end-of-turn token), like the rollouts it scores;
- prompts are the distinct request messages of recent completions (real user prompts); a stable hash of each
  prompt sets a share aside for the gate, so the gate judges on prompts PPO did not optimise on;
- the token counts of recently served replies set the rollouts' length cap (see :func:`length_cap`);
- each judgement counts once (a user's latest about the same choices), blocked users' feedback is left out, and no
  user holds more than ``max_user_share`` of the training weight (:mod:`alignd.trainer.safeguards`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from alignd.messages import plain_messages
from alignd.store import Label, PreferencePair, Store
from alignd.trainer.config import DataConfig
from alignd.trainer.reward_model import PairGroup
from alignd.trainer.safeguards import Contributor, UserSignal, apply_caps, collapse, contributor

__all__ = ["TrainingData", "is_heldout", "length_cap", "load_training_data"]


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
    heldout_labels: list[Label]
    """Labels of held-out completions: the reward model's accuracy is measured on them too."""
    heldout_by_kind: dict[str, tuple[list[PairGroup], list[Label]]]
    """The held-out pairs and labels of each feedback kind."""
    ppo_prompts: list[list[dict[str, str]]]
    """Distinct recent user prompts for rollouts."""
    gate_prompts: list[list[dict[str, str]]]
    """Distinct held-out prompts both policies answer at the gate."""
    new_pair_ids: list[int] = field(default_factory=list)
    """Rows of ``preference_pairs`` this run consumes (marked used when the run succeeds)."""
    new_label_ids: list[int] = field(default_factory=list)
    truncated_replies: set[str] = field(default_factory=set)
    """Reply texts that were cut at their length limit when served."""
    served_lengths: list[int] = field(default_factory=list)
    """Token counts of recently served replies."""
    users: UserSignal = field(default_factory=UserSignal)
    """The same judgements with who made each, before the share cap (for the agreement check), and the report."""

    def counts(self) -> dict[str, int]:
        return {"train_pairs": sum(map(len, self.train_pairs)), "heldout_pairs": sum(map(len, self.heldout_pairs)),
                "train_labels": len(self.train_labels), "heldout_labels": len(self.heldout_labels),
                "new_pairs": len(self.new_pair_ids),
                "new_labels": len(self.new_label_ids), "ppo_prompts": len(self.ppo_prompts),
                "gate_prompts": len(self.gate_prompts)}


def _owned_groups(rows: list[dict[str, Any]]) -> tuple[list[PairGroup], list[Contributor], list[str]]:
    """Stored pair rows as the one pair type, grouped by the feedback event that made them (in first-seen order),
    with who made each group and its feedback kind."""
    groups: dict[str, list[PreferencePair]] = {}
    owners: dict[str, tuple[Contributor, str]] = {}
    for row in rows:
        groups.setdefault(row["feedback_id"], []).append(PreferencePair(
            prompt=plain_messages(row["prompt"]), chosen=row["chosen"], rejected=row["rejected"],
            margin=float(row["margin"]), weight=float(row["weight"]), chosen_choice=row.get("chosen_choice"),
            rejected_choice=row.get("rejected_choice")))
        owners.setdefault(row["feedback_id"], (contributor(row), row["kind"]))
    return list(groups.values()), [o for o, _ in owners.values()], [k for _, k in owners.values()]


def _label(row: dict[str, Any]) -> Label:
    return Label(prompt=plain_messages(row["prompt"]), reply=row["reply"], good=bool(row["good"]),
                 weight=float(row["weight"]), choice=row.get("choice"))


async def _rows(store: Store, table: str, cap: int) -> tuple[list[dict[str, Any]], list[int]]:
    """``(rows, new row ids)`` of one signal table: every unused row (up to ``cap``), then the most recent used ones."""
    new = await store.signal_rows(table, used=False, limit=cap)
    old = await store.signal_rows(table, used=True, limit=max(cap - len(new), 0))
    return new + old, [r["id"] for r in new]


def _weigh_and_split(rows: list[dict[str, Any]], config: DataConfig
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train rows, held-out rows)``, oldest first as collected, weights scaled by recency."""
    rows = sorted(rows, key=lambda r: r["id"], reverse=True)  # newest first
    for rank, row in enumerate(rows):
        row["weight"] = float(row["weight"]) * 0.5 ** (rank / config.recency_half_life)
    held = [r for r in rows if is_heldout(r["completion_id"], config.heldout_fraction)]
    train = [r for r in rows if not is_heldout(r["completion_id"], config.heldout_fraction)]
    return train[::-1], held[::-1]


async def _judgements(store: Store, config: DataConfig
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int], list[int], dict[str, Any],
                                 dict[str, str]]:
    """Pair and label rows that count (latest judgement only, blocked users left out), the new row ids, what
    was left out, and the operators' trust states."""
    pairs, pair_ids = await _rows(store, "preference_pairs", config.max_pairs)
    labels, label_ids = await _rows(store, "labels", config.max_labels)
    silent = await store.silent_events([r["completion_id"] for r in pairs + labels])
    kept_pairs, kept_labels = collapse(pairs, labels, silent)
    trust = await store.trust_states()
    blocked = {user for user, state in trust.items() if state == "blocked"}
    report = {"superseded_pairs": len(pairs) - len(kept_pairs), "superseded_labels": len(labels) - len(kept_labels),
              "blocked_pairs": sum(r["user"] in blocked for r in kept_pairs),
              "blocked_labels": sum(r["user"] in blocked for r in kept_labels)}
    kept_pairs = [r for r in kept_pairs if r["user"] not in blocked]
    kept_labels = [r for r in kept_labels if r["user"] not in blocked]
    return kept_pairs, kept_labels, pair_ids, label_ids, report, trust


async def _truncated_replies(store: Store, pairs: list[dict[str, Any]], labels: list[dict[str, Any]]) -> set[str]:
    cut = await store.truncated_choices([r["completion_id"] for r in pairs + labels])
    texts = {r["chosen"] for r in pairs if (r["completion_id"], r["chosen_choice"]) in cut}
    texts |= {r["rejected"] for r in pairs if (r["completion_id"], r["rejected_choice"]) in cut}
    return texts | {r["reply"] for r in labels if (r["completion_id"], r["choice"]) in cut}


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
    pair_rows, label_rows, pair_ids, label_ids, report, trust = await _judgements(store, config)
    pairs, heldout_pairs = _weigh_and_split(pair_rows, config)
    labels, heldout_labels = _weigh_and_split(label_rows, config)
    ppo_prompts, gate_prompts = await _prompts(store, config)
    users = UserSignal(trust=trust, report=report)
    users.train_groups, users.train_group_owners, _ = _owned_groups(pairs)
    users.heldout_groups, users.heldout_group_owners, group_kinds = _owned_groups(heldout_pairs)
    users.train_labels, users.train_label_owners = [_label(r) for r in labels], [contributor(r) for r in labels]
    users.heldout_labels = [_label(r) for r in heldout_labels]
    users.heldout_label_owners = [contributor(r) for r in heldout_labels]
    by_kind = {kind: ([g for g, k in zip(users.heldout_groups, group_kinds, strict=True) if k == kind],
                      [x for x, r in zip(users.heldout_labels, heldout_labels, strict=True) if r["kind"] == kind])
               for kind in sorted({*group_kinds, *(r["kind"] for r in heldout_labels)})}
    train_pairs, train_labels, report["share"] = apply_caps(users, config.max_user_share)
    return TrainingData(train_pairs=train_pairs, heldout_pairs=users.heldout_groups,
                        train_labels=train_labels, heldout_labels=users.heldout_labels,
                        heldout_by_kind=by_kind, ppo_prompts=ppo_prompts, gate_prompts=gate_prompts,
                        new_pair_ids=pair_ids, new_label_ids=label_ids,
                        truncated_replies=await _truncated_replies(store, pairs + heldout_pairs,
                                                                   labels + heldout_labels),
                        served_lengths=await store.served_reply_lengths(config.served_lengths), users=users)


def length_cap(served_lengths: list[int], upper: int, lower: int = 16) -> int:
    """The rollouts' and the gate's reply length limit: the 95th percentile of what users were served, within
    ``[lower, upper]`` (``upper`` when nothing was served yet). Generating far past what users see costs time and
    teaches nothing; cutting well short of it would judge replies by a start users never stop at."""
    if not served_lengths:
        return upper
    ordered = sorted(served_lengths)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return max(lower, min(upper, p95))


def leave_out_flagged(data: TrainingData, screened: UserSignal, max_share: float) -> None:
    """Train and evaluate on ``screened`` (the judgements of users :func:`~alignd.trainer.safeguards.screen_users`
    kept), the share cap recomputed over them."""
    data.train_pairs, data.train_labels, screened.report["share"] = apply_caps(screened, max_share)
    data.heldout_pairs, data.heldout_labels = screened.heldout_groups, screened.heldout_labels
    kept = {id(x) for x in [*screened.heldout_groups, *screened.heldout_labels]}
    data.heldout_by_kind = {kind: ([g for g in groups if id(g) in kept], [x for x in labels if id(x) in kept])
                            for kind, (groups, labels) in data.heldout_by_kind.items()}
    data.users = screened
