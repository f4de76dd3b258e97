"""Safeguards against poisoned training data: each judgement counts once, no user outweighs a share of a run, users
far from the consensus are flagged and left out, and operators' trust states apply.

A few percent of poisoned preferences can survive RLHF (Rando & Tramèr, "Universal Jailbreak Backdoors from
Poisoned Human Feedback", ICLR 2024), and one client can send as many events as it likes. So, every run:

1. **Latest judgement only** (:func:`collapse`): per completion, user and feedback kind, only the user's latest
   event about the same choices counts: a thumbs about one choice (its *slot* is that choice), a pairwise
   comparison about its two choices, any other event (a ranking) about the whole completion. Repeating a judgement
   counts once; alternating thumbs on two choices leave the one pair their final verdicts make (none when they
   agree); a new ranking replaces the user's earlier one; a pairwise ``tie`` after a win withdraws the win.
2. **Blocked users** (an operator's decision) are left out, their feedback stored but not trained on.
3. **Share cap** (:func:`cap_factors`): each user's pairs (and, separately, labels) are scaled down so that no user
   holds more than ``max_user_share`` of the run's total weight. Weights, not events: nothing is dropped. With fewer
   than 1/``max_user_share`` users the cap cannot be met; then every user weighs the same (1/n each).
4. **Agreement** (:func:`screen_users`): users are dealt into folds; for each fold a reward model is fitted on the
   other folds' users only and judges the fold's users' judgements (training and held-out). A user whose agreement
   with it is improbably low for a coin (one-sided binomial test against 0.5, ``p < flag_p_value``) is flagged
   and left out of this run (and of its held-out accuracy); the share cap is then recomputed over the rest.
   ``trusted`` users are scored but never flagged. Honest users agree far more often than half the time (the
   reward model's accuracy), so this flags users who consistently judge against everyone else.

Users are who the feedback says judged: the ``user`` of the event (a ``user`` key is its own user; a ``frontend``
key names its users), else the principal whose key sent it, else one anonymous contributor. The cap and the flags
are as good as those ids: a frontend or an open server can claim any ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from alignd.store.records import Label, PreferencePair

if TYPE_CHECKING:
    from alignd.trainer.config import TrainerConfig
    from alignd.trainer.models import ModelStack

__all__ = [
    "Contributor",
    "UserSignal",
    "apply_caps",
    "binomial_low_tail",
    "cap_factors",
    "collapse",
    "contributor",
    "record_scores",
    "screen_users",
]

log = logging.getLogger(__name__)

Contributor = tuple[str | None, str | None]
"""Who judged: ``(user, None)`` for an event with a user id, ``(None, principal)`` for one without (``(None, None)``:
anonymous)."""

T = TypeVar("T")


def contributor(row: dict[str, Any]) -> Contributor:
    user = row.get("user")
    return (user, None) if user is not None else (None, row.get("principal"))


def describe(who: Contributor) -> dict[str, str | None]:
    """A contributor as the run's report shows it."""
    return {"user": who[0], "principal": who[1]} if who[0] is None else {"user": who[0]}


# --- 1. latest judgement only ----------------------------------------------------------------------------------


def _slot(event_choice: int | None, payload: Any) -> tuple[Any, ...]:
    """What an event judges: one choice, a set of choices (a pairwise comparison's), or the whole completion."""
    if event_choice is not None:
        return ("choice", event_choice)
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if isinstance(choices, list) and all(isinstance(c, int) for c in choices):
        return ("choices", tuple(sorted(choices)))
    return ("all",)


def _event_order(row: dict[str, Any]) -> tuple[datetime, str]:
    return row["created"], row["feedback_id"]


def collapse(pairs: list[dict[str, Any]], labels: list[dict[str, Any]], silent: Iterable[dict[str, Any]] = ()
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pair and label rows that count: per (completion, contributor, kind, slot) only the latest event's; a pair
    an event made with another choice's earlier verdict (thumbs) only if that verdict was still the latest one.
    ``silent`` are events that made no pair or label (a ``tie``): rows with ``feedback_id``, ``completion_id``,
    ``kind``, ``created``, ``user``, ``principal``, ``event_choice``, ``event_payload``, as the signal rows carry."""
    latest: dict[tuple[Any, ...], tuple[datetime, str]] = {}

    def judge(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["completion_id"], contributor(row), row["kind"]

    def slot_key(row: dict[str, Any]) -> tuple[Any, ...]:
        return *judge(row), _slot(row.get("event_choice"), row.get("event_payload"))

    for row in [*pairs, *labels, *silent]:
        key = slot_key(row)
        latest[key] = max(latest.get(key, _event_order(row)), _event_order(row))
    kept_labels = [r for r in labels if _event_order(r) == latest[slot_key(r)]]
    kept_pairs = []
    for row in pairs:
        if _event_order(row) != latest[slot_key(row)]:
            continue
        own = row.get("event_choice")
        if own is not None and own in (row["chosen_choice"], row["rejected_choice"]):
            other = row["rejected_choice"] if own == row["chosen_choice"] else row["chosen_choice"]
            other_latest = latest.get((*judge(row), ("choice", other)))
            if other_latest is not None and other_latest > _event_order(row):
                continue  # the other choice's verdict changed later: that later event made the pair that counts
        kept_pairs.append(row)
    return kept_pairs, kept_labels


# --- 3. share cap -----------------------------------------------------------------------------------------------


def cap_factors(totals: dict[T, float], max_share: float) -> dict[T, float]:
    """The factor (≤ 1) each contributor's weights are multiplied by so that none holds more than ``max_share`` of
    the total afterwards: the largest are lowered to a common level ``c`` with ``c = max_share × (total after)``
    (water-filling), the rest untouched. When that cannot be met (fewer than 1/``max_share`` contributors), every
    contributor is lowered to the smallest one's total, so that all weigh the same."""
    order = sorted((w, who) for who, w in totals.items() if w > 0)[::-1]  # (total, contributor), largest first
    factors = {who: 1.0 for who in totals}
    grand = sum(w for w, _ in order)
    if not order or order[0][0] <= max_share * grand * (1 + 1e-9):
        return factors
    rest = grand
    for k in range(1, len(order)):
        rest -= order[k - 1][0]
        if k * max_share >= 1:
            break
        level = max_share * rest / (1 - k * max_share)
        if order[k][0] <= level * (1 + 1e-9):
            for w, who in order[:k]:
                factors[who] = level / w
            return factors
    smallest = order[-1][0]
    return {who: (smallest / w if w > 0 else 1.0) for who, w in totals.items()}


def shares(totals: dict[T, float]) -> dict[T, float]:
    grand = sum(totals.values())
    return {who: w / grand for who, w in totals.items()} if grand > 0 else {}


# --- 4. agreement -----------------------------------------------------------------------------------------------


def binomial_low_tail(successes: int, trials: int) -> float:
    """P(X ≤ successes) for X ~ Binomial(trials, 0.5): how likely a coin agrees this rarely or less."""
    if trials <= 0:
        return 1.0
    return sum(math.comb(trials, i) for i in range(max(0, successes) + 1)) / 2 ** trials


def _stable(who: Contributor) -> str:
    return hashlib.sha256(repr(who).encode()).hexdigest()


@dataclass
class UserSignal:
    """A run's judgements with who made each: pair groups (one feedback event each) and labels, for training and
    held out, with the weights they had before the share cap (recency-weighted)."""

    train_groups: list[Sequence[PreferencePair]] = field(default_factory=list)
    train_group_owners: list[Contributor] = field(default_factory=list)
    train_labels: list[Label] = field(default_factory=list)
    train_label_owners: list[Contributor] = field(default_factory=list)
    heldout_groups: list[Sequence[PreferencePair]] = field(default_factory=list)
    heldout_group_owners: list[Contributor] = field(default_factory=list)
    heldout_labels: list[Label] = field(default_factory=list)
    heldout_label_owners: list[Contributor] = field(default_factory=list)
    trust: dict[str, str] = field(default_factory=dict)
    """Operators' trust states of users (those not ``default``)."""
    report: dict[str, Any] = field(default_factory=dict)
    """What the run reports about users (``metrics.users``)."""

    def contributors(self) -> list[Contributor]:
        """Everyone with a judgement, in a stable order (by a hash of the id, not by volume)."""
        everyone = {*self.train_group_owners, *self.train_label_owners, *self.heldout_group_owners,
                    *self.heldout_label_owners}
        return sorted(everyone, key=_stable)

    def without(self, excluded: Collection[Contributor]) -> UserSignal:
        """The same signal less ``excluded`` contributors' judgements."""
        def keep(items: list[Any], owners: list[Contributor]) -> tuple[list[Any], list[Contributor]]:
            pairs = [(item, who) for item, who in zip(items, owners, strict=True) if who not in excluded]
            return [i for i, _ in pairs], [w for _, w in pairs]

        out = UserSignal(trust=self.trust, report=self.report)
        out.train_groups, out.train_group_owners = keep(self.train_groups, self.train_group_owners)
        out.train_labels, out.train_label_owners = keep(self.train_labels, self.train_label_owners)
        out.heldout_groups, out.heldout_group_owners = keep(self.heldout_groups, self.heldout_group_owners)
        out.heldout_labels, out.heldout_label_owners = keep(self.heldout_labels, self.heldout_label_owners)
        return out


def _totals(items: Sequence[Any], owners: Sequence[Contributor], weight: Callable[[Any], float]
            ) -> dict[Contributor, float]:
    totals: dict[Contributor, float] = {}
    for item, who in zip(items, owners, strict=True):
        totals[who] = totals.get(who, 0.0) + weight(item)
    return totals


def _group_weight(group: Sequence[PreferencePair]) -> float:
    return sum(p.weight for p in group)


def apply_caps(signal: UserSignal, max_share: float) -> tuple[list[list[PreferencePair]], list[Label], dict[str, Any]]:
    """The training groups and labels with each contributor's weights scaled by :func:`cap_factors` (pairs and
    labels each on their own), and the figures of the cap: contributors, largest share before and after,
    the effective number of users (1/Σ share², after), and the users whose weights were lowered."""
    pair_totals = _totals(signal.train_groups, signal.train_group_owners, _group_weight)
    label_totals = _totals(signal.train_labels, signal.train_label_owners, lambda x: x.weight)
    pair_factors, label_factors = cap_factors(pair_totals, max_share), cap_factors(label_totals, max_share)
    groups = [[msgspec.structs.replace(p, weight=p.weight * pair_factors[who]) for p in g]
              for g, who in zip(signal.train_groups, signal.train_group_owners, strict=True)]
    labels = [msgspec.structs.replace(x, weight=x.weight * label_factors[who])
              for x, who in zip(signal.train_labels, signal.train_label_owners, strict=True)]
    figures = {"pairs": _share_figures(pair_totals, pair_factors),
               "labels": _share_figures(label_totals, label_factors)}
    return groups, labels, figures


def _share_figures(totals: dict[Contributor, float], factors: dict[Contributor, float]) -> dict[str, Any]:
    before = shares(totals)
    after = shares({who: w * factors[who] for who, w in totals.items()})
    capped = sorted((who for who, f in factors.items() if f < 1 - 1e-9), key=lambda who: -before[who])
    return {
        "users": len(totals),
        "largest_share_before": round(max(before.values(), default=0.0), 4),
        "largest_share_after": round(max(after.values(), default=0.0), 4),
        "effective_users": round(1 / sum(s * s for s in after.values()), 2) if after else 0.0,
        "capped": [{**describe(who), "share_before": round(before[who], 4), "share_after": round(after[who], 4)}
                   for who in capped[:20]],
        "capped_users": len(capped),
    }


def screen_users(stack: ModelStack, signal: UserSignal, config: TrainerConfig, *, truncated: Collection[str] = (),
                 seed: int = 0) -> tuple[UserSignal, list[tuple[Contributor, int, float, float]]]:
    """Score every contributor's agreement with a reward model fitted without them (``config.data.agreement_folds``
    folds of contributors, each fitted on the others' training judgements with the share cap applied), flag the
    improbably contrary ones and return the signal without them, with ``(contributor, judgements, agreement,
    p-value)`` of each scored one. The stack's ``reward`` adapter is left as the last fold's fit: the run fits its
    own afterwards. Does nothing (no scores) with flagging off, or fewer than two contributors."""
    from alignd.trainer.reward_model import _Encoder, evaluate_labels, evaluate_pairs, train_reward_model

    data = config.data
    order = signal.contributors()
    folds = min(data.agreement_folds, len(order))
    signal.report.update(scored_users=0, flagged=[])
    if data.flag_p_value <= 0 or folds < 2:
        return signal, []
    scored: list[tuple[Contributor, int, float, float]] = []
    for fold in range(folds):
        inside = set(order[fold::folds])  # dealt round-robin: folds differ in size by one user at most
        others = signal.without(inside)
        groups, labels, _ = apply_caps(others, data.max_user_share)
        if not (groups or labels):
            continue
        train_reward_model(stack, groups, config.reward, config.lora, labels=labels, heldout=[], seed=seed,
                           truncated=truncated)
        encoder = _Encoder(stack, config.reward, truncated)
        right: dict[Contributor, float] = {}
        count: dict[Contributor, int] = {}
        for group, who in [*zip(signal.train_groups, signal.train_group_owners, strict=True),
                           *zip(signal.heldout_groups, signal.heldout_group_owners, strict=True)]:
            if who in inside and group:
                right[who] = right.get(who, 0.0) + evaluate_pairs(stack, [group], config.reward, encoder)[0]
                count[who] = count.get(who, 0) + 1
        for label, who in [*zip(signal.train_labels, signal.train_label_owners, strict=True),
                           *zip(signal.heldout_labels, signal.heldout_label_owners, strict=True)]:
            if who in inside:
                right[who] = right.get(who, 0.0) + evaluate_labels(stack, [label], config.reward, encoder)
                count[who] = count.get(who, 0) + 1
        for who, n in count.items():
            scored.append((who, n, right[who] / n, binomial_low_tail(round(right[who]), n)))
    flagged = {who for who, _, _, p in scored if p < data.flag_p_value and signal.trust.get(who[0] or "") != "trusted"}
    signal.report["scored_users"] = len(scored)
    signal.report["flagged"] = [{**describe(who), "judgements": n, "agreement": round(a, 4), "p_value": p}
                                for who, n, a, p in sorted(scored, key=lambda s: s[3]) if who in flagged]
    return signal.without(flagged), scored


def record_scores(database_url: str, run_id: str, scored: list[tuple[Contributor, int, float, float]],
                  flag_p_value: float, trust: dict[str, str]) -> None:
    """Write the scores of users with ids to the store (``GET /v1/admin/users``); contributors known only by their
    principal or anonymous are in the run's report only. A store that cannot take them costs the operator's view,
    not the run: the flags already apply to this run's data and are in its report."""
    from alignd.store import Store
    from alignd.store.users import UserScore

    scores = [UserScore(user=who[0], agreement=a, judgements=n, p_value=p,
                        flagged=p < flag_p_value and trust.get(who[0]) != "trusted")
              for who, n, a, p in scored if who[0] is not None]
    if not scores:
        return

    async def write() -> None:
        store = await Store.open(database_url)
        try:
            await store.record_scores(run_id, scores, datetime.now(UTC))
        finally:
            await store.close()

    try:
        asyncio.run(write())
    except Exception:
        log.warning("could not store the users' agreement scores of run %s", run_id, exc_info=True)
