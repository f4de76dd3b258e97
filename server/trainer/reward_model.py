"""The reward model: a LoRA adapter plus a scalar head on the frozen base, read at a reply's last token.

Fitted with the Bradley–Terry loss on preference pairs (with margins and weights; a ranking's pairs share one batch
and each reply in it is scored once, as in InstructGPT) plus binary cross-entropy for unpaired good/bad labels.
Each run reports held-out pairwise accuracy, and rewards are normalised to mean 0, std 1 over the reference
policy's own replies, so that β, penalties and the gate margin mean the same across runs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from alignd.store.records import Label, PreferencePair
from alignd.trainer.config import AdapterConfig, RewardConfig
from alignd.trainer.distributed import all_reduce_grads, map_rows, same_start, shard
from alignd.trainer.losses import label_loss, reward_loss
from alignd.trainer.models import REWARD, ModelStack
from alignd.trainer.rollout import Rollout, collate_rollouts, encode_prompt

__all__ = [
    "MANIFEST",
    "PairGroup",
    "RewardFigures",
    "RewardNormalization",
    "evaluate_labels",
    "evaluate_pairs",
    "fit_normalization",
    "heldout_figures",
    "last_token_rewards",
    "load_reward_model",
    "save_reward_model",
    "score_rollouts",
    "score_with_features",
    "train_reward_model",
    "wilson_interval",
]

log = logging.getLogger(__name__)

MANIFEST = "reward.json"
"""Figures of a saved reward model, next to its adapter."""


PairGroup = Sequence[PreferencePair]
"""The pairs of one feedback event (a ranking's C(K,2), or a single pair): they share a batch, and a side of the
held-out split. Pairs and labels are the feedback plugins' own types (:mod:`alignd.store.records`)."""


@dataclass
class RewardNormalization:
    """Affine map from raw head outputs to rewards with mean 0, std 1 over reference-policy replies."""

    mean: float = 0.0
    std: float = 1.0

    def apply(self, raw: Tensor) -> Tensor:
        return (raw - self.mean) / self.std


@dataclass
class RewardFigures:
    """What a reward-model fit reports (saved with it)."""

    train_loss: float
    """Mean training loss over the last epoch."""
    heldout_accuracy: float | None
    """Share of held-out judgements the model agrees with: pairs whose chosen reply scores higher, labels whose
    score has the label's sign (None with nothing held out)."""
    heldout_loss: float | None
    """Bradley–Terry loss on the held-out pairs."""
    train_pairs: int
    heldout_pairs: int
    labels: int
    steps: int
    seconds: float
    heldout_labels: int = 0
    heldout_judgements: int = 0
    """Held-out feedback events with pairs (a ranking is one judgement) plus held-out labels: the interval's n."""
    heldout_correct: int = 0
    """Of those, judged right (an event counts as the share of its pairs ranked right; rounded here)."""
    heldout_interval: tuple[float, float] | None = None
    """Wilson confidence interval of ``heldout_accuracy`` (at the run's ``confidence``)."""
    warm_start: str | None = None
    """The earlier reward model this one continued from (None: a fresh adapter)."""
    base_model: str | None = None
    """The base model it was fitted on (a later run continues from it only on the same base)."""
    normalization: RewardNormalization = field(default_factory=RewardNormalization)
    """Raw-score mean and std over reference replies (identity until :func:`fit_normalization`)."""


# --- data -----------------------------------------------------------------------------------------------------

_Unit = PairGroup | Label  # what is never split across batches


class _Encoder:
    """Token ids of a prompt and a reply as the policy would have produced it, cached (a reply appears in many pairs
    and every epoch): a finished reply ends with the end-of-turn token, a truncated one (cut at its length limit
    when served, or here at ``max_reply_tokens``) does not, exactly like the rollouts the model will score."""

    def __init__(self, stack: ModelStack, config: RewardConfig, truncated: Collection[str] = ()) -> None:
        self.tokenizer = stack.tokenizer
        self.config = config
        self.truncated = truncated
        self._cache: dict[tuple[str, str], tuple[int, ...]] = {}

    def __call__(self, prompt: list[dict[str, Any]], reply: str) -> tuple[int, ...]:
        key = (json.dumps(prompt, sort_keys=True), reply)
        if key not in self._cache:
            prompt_ids = encode_prompt(self.tokenizer, prompt, self.config.max_prompt_tokens)
            reply_ids = self.tokenizer.encode(reply, add_special_tokens=False)
            finished = reply not in self.truncated and len(reply_ids) <= self.config.max_reply_tokens
            end = (self.tokenizer.eos_token_id,) if finished else ()
            self._cache[key] = (*prompt_ids, *reply_ids[: self.config.max_reply_tokens], *end)
        return self._cache[key]


@dataclass
class _Batch:
    """Unique replies of some pairs and labels, scored once each; pairs and labels index into them."""

    sequences: Tensor  # (N, L) right-padded prompt + reply + EOS
    attention_mask: Tensor  # (N, L)
    chosen: Tensor  # (P,) row of each pair's chosen reply
    rejected: Tensor  # (P,) row of each pair's rejected reply
    margin: Tensor  # (P,)
    weight: Tensor  # (P,)
    labelled: Tensor  # (M,) row of each labelled reply
    label: Tensor  # (M,) 1.0 good, 0.0 bad
    label_weight: Tensor  # (M,)


def _units(groups: Sequence[PairGroup], labels: Sequence[Label]) -> list[_Unit]:
    """The non-empty pair groups, then the labels."""
    return [*(g for g in groups if g), *labels]


def _split_heldout(
    groups: Sequence[PairGroup], fraction: float, rng: random.Random
) -> tuple[list[PairGroup], list[PairGroup]]:
    """Hold out whole groups, about ``fraction`` of them."""
    shuffled = [g for g in groups if g]
    rng.shuffle(shuffled)
    n_heldout = max(1, round(len(shuffled) * fraction)) if fraction > 0 and len(shuffled) > 1 else 0
    return shuffled[n_heldout:], shuffled[:n_heldout]


def _pack(units: Sequence[_Unit], batch_size: int) -> list[list[_Unit]]:
    """Consecutive units per batch until it holds ``batch_size`` sequences (a ranking may run over)."""
    batches: list[list[_Unit]] = [[]]
    size = 0
    for unit in units:
        if size >= batch_size:
            batches.append([])
            size = 0
        batches[-1].append(unit)
        size += 1 if isinstance(unit, Label) else 2 * len(unit)  # an upper bound; duplicates are merged later
    return [b for b in batches if b]


def _collate(units: Sequence[_Unit], encoder: _Encoder, pad_id: int, device: torch.device) -> _Batch:
    rows: dict[tuple[int, ...], int] = {}

    def row(prompt: list[dict[str, Any]], reply: str) -> int:
        return rows.setdefault(encoder(prompt, reply), len(rows))

    pairs = [p for u in units if not isinstance(u, Label) for p in u]
    labels = [u for u in units if isinstance(u, Label)]
    chosen = [row(p.prompt, p.chosen) for p in pairs]
    rejected = [row(p.prompt, p.rejected) for p in pairs]
    labelled = [row(x.prompt, x.reply) for x in labels]
    width = max(len(ids) for ids in rows)
    sequences = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, L)
    attention_mask = torch.zeros_like(sequences)  # (N, L)
    for ids, index in rows.items():
        sequences[index, : len(ids)] = torch.tensor(ids)
        attention_mask[index, : len(ids)] = 1

    def floats(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    return _Batch(
        sequences=sequences.to(device),
        attention_mask=attention_mask.to(device),
        chosen=torch.tensor(chosen, dtype=torch.long, device=device),
        rejected=torch.tensor(rejected, dtype=torch.long, device=device),
        margin=floats([p.margin for p in pairs]),
        weight=floats([p.weight for p in pairs]),
        labelled=torch.tensor(labelled, dtype=torch.long, device=device),
        label=floats([1.0 if x.good else 0.0 for x in labels]),
        label_weight=floats([x.weight for x in labels]),
    )


# --- scoring --------------------------------------------------------------------------------------------------


def last_token_rewards(stack: ModelStack, sequences: Tensor, attention_mask: Tensor, role: str = REWARD) -> Tensor:
    """Raw reward-head output at each row's last real token, (N,); call inside ``stack.use(role)``."""
    outputs = stack.head_outputs(role, sequences, attention_mask)  # (N, L)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # (N,) works for either padding side
    return outputs.gather(1, last.unsqueeze(1)).squeeze(1)  # (N,)


@torch.no_grad()
def score_rollouts(
    stack: ModelStack, sequences: Tensor, attention_mask: Tensor, normalization: RewardNormalization, chunk: int = 16,
    role: str = REWARD,
) -> Tensor:
    """Normalised reward of each sequence (prompt + reply), (B,) float32, by the reward model in adapter ``role``;
    with several processes each rank scores its block of rows."""

    def block(first: int, stop: int) -> tuple[Tensor]:
        scores = [torch.zeros(0, device=stack.device)]
        with stack.use(role):
            for start in range(first, stop, chunk):
                rows = slice(start, min(start + chunk, stop))
                scores.append(last_token_rewards(stack, sequences[rows], attention_mask[rows], role))
        return (torch.cat(scores),)

    return normalization.apply(map_rows(block, sequences.shape[0])[0])  # (B,)


@torch.no_grad()
def score_with_features(
    stack: ModelStack,
    sequences: Tensor,  # (B, P + R)
    attention_mask: Tensor,  # (B, P + R)
    normalization: RewardNormalization,
    response_len: int,
    chunk: int = 16,
) -> tuple[Tensor, Tensor]:
    """``(scores, features)``: the normalised reward of each sequence, (B,) float32, and the reward adapter's
    hidden states where each reply token is predicted, (B, R, H) in the compute dtype (what the critic reads); with
    several processes each rank passes its block of rows."""

    def block(first: int, stop: int) -> tuple[Tensor, Tensor]:
        scores, features = [], []
        with stack.use(REWARD):
            for start in range(first, stop, chunk):
                end = min(start + chunk, stop)
                seq, mask = sequences[start:end], attention_mask[start:end]  # (b, P + R)
                hidden = stack.hidden_states(seq, mask)  # (b, P + R, H)
                last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # (b,)
                scores.append(stack.heads[REWARD](hidden[torch.arange(len(seq), device=seq.device), last]))  # (b,)
                features.append(hidden[:, -response_len - 1 : -1])  # (b, R, H)
        return torch.cat(scores), torch.cat(features)

    scores, features = map_rows(block, sequences.shape[0])
    return normalization.apply(scores), features


def _batch_loss(stack: ModelStack, batch: _Batch, label_coef: float, role: str = REWARD,
                mean_weights: tuple[float | None, float | None] = (None, None),
                of: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """``(loss, correct)``: BT over pairs plus ``label_coef`` × BCE over labels; correct is (P,) bool.
    ``mean_weights``: the mean pair and label weight of the whole training set (see :func:`reward_loss`). ``of``:
    the pairs and labels of the whole batch this is a rank's share of; each term is then its share of the batch's
    (exact with ``mean_weights``: the terms are sums over a fixed denominator)."""
    r = last_token_rewards(stack, batch.sequences, batch.attention_mask, role)  # (N,)
    r_chosen, r_rejected = r[batch.chosen], r[batch.rejected]  # (P,), (P,)
    pairs, labels = of or (len(batch.chosen), len(batch.labelled))
    loss = torch.zeros((), device=r.device)
    if len(batch.chosen):
        loss = loss + reward_loss(r_chosen, r_rejected, batch.margin, batch.weight, mean_weights[0]) * (
            len(batch.chosen) / pairs)
    if len(batch.labelled):
        loss = loss + label_coef * label_loss(r[batch.labelled], batch.label, batch.label_weight, mean_weights[1]) * (
            len(batch.labelled) / labels)
    return loss, (r_chosen > r_rejected).detach()


def _count(units: Sequence[_Unit]) -> tuple[int, int]:
    """``(pairs, labels)`` in some units."""
    labels = sum(1 for u in units if isinstance(u, Label))
    return sum(len(u) for u in units if not isinstance(u, Label)), labels


# --- fitting --------------------------------------------------------------------------------------------------


def train_reward_model(
    stack: ModelStack,
    groups: Sequence[PairGroup],
    config: RewardConfig,
    adapter: AdapterConfig,
    labels: Sequence[Label] = (),
    heldout: Sequence[PairGroup] | None = None,
    seed: int = 0,
    truncated: Collection[str] = (),
    heldout_labels: Sequence[Label] = (),
    warm_start: str | Path | None = None,
    confidence: float = 0.95,
    role: str = REWARD,
) -> RewardFigures:
    """Fit the ``role`` adapter and head (``reward``, or the gate's judge): continued from the reward model saved in
    ``warm_start`` when there is one of the same shape (what earlier runs learned carries over), else fresh. Some of
    the ``groups`` are held out unless ``heldout`` is given; accuracy is measured on the held-out pairs and
    ``heldout_labels``."""
    started = time.monotonic()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    train = list(groups)
    if heldout is None:
        train, heldout = _split_heldout(train, config.heldout_fraction, rng)
    warm = _warm_start(stack, warm_start, adapter, role)
    if not warm:
        stack.add_adapter(role, adapter, head=True)
    params = stack.role_parameters(role)
    same_start(params)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    encoder = _Encoder(stack, config, truncated)
    pad_id = stack.tokenizer.pad_token_id
    units = _units(train, labels)
    # Per-pair weights hold across batches (a capped user's light pairs stay light wherever they fall).
    pair_weights, label_weights = [p.weight for g in train for p in g], [x.weight for x in labels]
    mean_weights = (sum(pair_weights) / len(pair_weights) if pair_weights else None,
                    sum(label_weights) / len(label_weights) if label_weights else None)
    steps, epoch_losses = 0, [0.0]
    for _ in range(config.epochs):
        rng.shuffle(units)
        epoch_losses = []
        for batch_units in _pack(units, config.batch_size):
            mine = shard(batch_units)  # this rank's units (all of them with one process)
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            if mine:
                batch = _collate(mine, encoder, pad_id, stack.device)
                with stack.use(role):
                    loss, _ = _batch_loss(stack, batch, config.label_coef, role, mean_weights, _count(batch_units))
                    loss.backward()
                loss_value = loss.item()
            loss_value = all_reduce_grads(params, {"loss": loss_value})["loss"]  # the ranks' shares add up
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            steps += 1
            epoch_losses.append(loss_value)
    heldout_loss = evaluate_pairs(stack, heldout, config, encoder, role)[1] if heldout else None
    correct, total = _judgements(stack, heldout, heldout_labels, config, encoder, role)
    return RewardFigures(
        train_loss=sum(epoch_losses) / max(1, len(epoch_losses)),
        heldout_accuracy=correct / total if total else None,
        heldout_loss=heldout_loss,
        heldout_labels=len(heldout_labels),
        heldout_judgements=total,
        heldout_correct=round(correct),
        heldout_interval=wilson_interval(correct, total, confidence) if total else None,
        warm_start=str(warm_start) if warm else None,
        base_model=stack.base_dir,
        train_pairs=sum(len(g) for g in train),
        heldout_pairs=sum(len(g) for g in heldout),
        labels=len(labels),
        steps=steps,
        seconds=round(time.monotonic() - started, 2),
    )


def _warm_start(stack: ModelStack, folder: str | Path | None, adapter: AdapterConfig, role: str = REWARD) -> bool:
    """Load the reward model saved in ``folder`` as the starting point; False (start fresh) when there is none, it
    was fitted on another base model or has another shape (the operator changed ``--model`` or the LoRA settings),
    or it cannot be loaded."""
    if folder is None or not (Path(folder) / MANIFEST).is_file():
        return False
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        saved = json.loads((Path(folder) / "adapter_config.json").read_text())
        same = (manifest.get("base_model") == stack.base_dir and saved.get("r") == adapter.r
                and saved.get("lora_alpha") == adapter.alpha
                and sorted(saved.get("target_modules") or []) == sorted(adapter.target_modules))
        if not same:
            log.info("reward model in %s was fitted on another base model or adapter shape: starting fresh", folder)
            return False
        stack.load_adapter(role, folder)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        log.warning("reward model in %s cannot be continued (%s): starting fresh", folder, e)
        return False
    return True


@torch.no_grad()
def evaluate_pairs(
    stack: ModelStack, groups: Sequence[PairGroup], config: RewardConfig, encoder: _Encoder | None = None,
    role: str = REWARD,
) -> tuple[float, float]:
    """``(accuracy, loss)`` of the reward model on pairs: share ranked right (ties count wrong), mean BT loss."""
    encoder = encoder or _Encoder(stack, config)
    correct, losses, total = 0, 0.0, 0
    with stack.use(role):
        for batch_units in _pack(_units(groups, []), config.batch_size):
            batch = _collate(batch_units, encoder, stack.tokenizer.pad_token_id, stack.device)
            loss, right = _batch_loss(stack, batch, 0.0, role)
            correct += int(right.sum())
            losses += loss.item() * len(right)
            total += len(right)
    return correct / max(1, total), losses / max(1, total)


@torch.no_grad()
def evaluate_labels(stack: ModelStack, labels: Sequence[Label], config: RewardConfig,
                    encoder: _Encoder | None = None, role: str = REWARD) -> int:
    """How many labels the reward model gets right: a positive raw score for a good reply, negative for a bad one
    (the sign the binary cross-entropy term trains)."""
    encoder = encoder or _Encoder(stack, config)
    correct = 0
    with stack.use(role):
        for batch_units in _pack(list(labels), config.batch_size):
            batch = _collate(batch_units, encoder, stack.tokenizer.pad_token_id, stack.device)
            r = last_token_rewards(stack, batch.sequences, batch.attention_mask, role)[batch.labelled]  # (M,)
            correct += int(((r > 0).float() == batch.label).sum())
    return correct


def wilson_interval(correct: float, total: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound for small samples and for 0 or all correct); (0, 1) for none."""
    if total == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def _judgements(stack: ModelStack, groups: Sequence[PairGroup], labels: Sequence[Label], config: RewardConfig,
                encoder: _Encoder, role: str = REWARD) -> tuple[float, int]:
    """``(right, judgements)``: one judgement per held-out feedback event (a ranking's pairs are one user's one
    judgement, not C(K,2) independent ones; it counts as the share of its pairs ranked right) and per label."""
    right = sum(evaluate_pairs(stack, [group], config, encoder, role)[0] for group in groups if group)
    right += evaluate_labels(stack, labels, config, encoder, role) if labels else 0
    return right, sum(1 for g in groups if g) + len(labels)


def heldout_figures(stack: ModelStack, groups: Sequence[PairGroup], labels: Sequence[Label], config: RewardConfig,
                    confidence: float, truncated: Collection[str] = (), role: str = REWARD) -> dict[str, Any]:
    """Accuracy on held-out feedback with its confidence interval (for one feedback kind's, say)."""
    right, total = _judgements(stack, groups, labels, config, _Encoder(stack, config, truncated), role)
    return {"accuracy": right / total if total else None, "n": total,
            "interval": wilson_interval(right, total, confidence) if total else None}


def fit_normalization(stack: ModelStack, reference_rollouts: Sequence[Rollout], role: str = REWARD
                      ) -> RewardNormalization:
    """Mean and std of raw rewards over replies sampled from the reference policy (the base, adapters off)."""
    sequences, attention_mask, _ = collate_rollouts(reference_rollouts, stack.tokenizer.pad_token_id, stack.device)
    raw = score_rollouts(stack, sequences, attention_mask, RewardNormalization(), role=role)  # (B,)
    std = raw.std().item() if len(raw) > 1 else 1.0
    return RewardNormalization(mean=raw.mean().item(), std=max(std, 1e-6))


# --- disk -----------------------------------------------------------------------------------------------------


def save_reward_model(stack: ModelStack, folder: str | Path, figures: RewardFigures, role: str = REWARD) -> Path:
    """Write the reward adapter (or another ``role``'s), its head and :data:`MANIFEST` (figures and normalisation)
    to ``folder``."""
    folder = stack.save_adapter(role, folder)
    (folder / MANIFEST).write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return folder


def load_reward_model(stack: ModelStack, folder: str | Path, role: str = REWARD) -> RewardFigures:
    """Load a saved reward model into ``stack`` as adapter ``role``; returns its figures."""
    stack.load_adapter(role, folder)
    saved = json.loads((Path(folder) / MANIFEST).read_text())
    normalization = RewardNormalization(**saved.pop("normalization"))
    if saved.get("heldout_interval") is not None:
        saved["heldout_interval"] = tuple(saved["heldout_interval"])
    return RewardFigures(**saved, normalization=normalization)
