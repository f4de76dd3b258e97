"""Build the offline demo chat model: tokenizer, small Llama, pretraining, Hugging Face save.

``alignd demo-model`` calls :func:`ensure_demo_model`; the result is an ordinary
Hugging Face model directory (safetensors, tokenizer with chat template,
``generation_config.json``) that vLLM and ``transformers`` load directly.
Builds are deterministic per seed on a given machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from alignd.demo.corpus import Dialogue, classify, generate_corpus, held_out_prompts

__all__ = [
    "CHAT_TEMPLATE",
    "PRESETS",
    "SPECIAL_TOKENS",
    "STAMP_FILE",
    "ModelPreset",
    "QualityReport",
    "build_demo_model",
    "config_hash",
    "ensure_demo_model",
    "evaluate_demo_model",
]

log = logging.getLogger(__name__)

# Bump when the build recipe changes in a way the preset fields do not capture.
_BUILD_FORMAT = 1

STAMP_FILE = "alignd-demo.json"
"""Name of the build stamp written next to the weights."""

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>")
"""Special tokens, in vocabulary order (ids 0..5)."""

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Only system, user and assistant roles are supported') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""Jinja chat template: ``<|bos|>`` then ``<|role|>content<|eos|>`` per message."""

_HEAD_DIM = 64  # vLLM's CPU attention rejects small heads (16); 64 works on every backend

# System prompts clients commonly send, so a leading system message does not throw the model off.
_SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a helpful chatbot. Answer the user's question.",
    "You are the alignd demo assistant.",
    "Answer the question.",
)
_SYSTEM_FRACTION = 0.25  # share of training examples with a system message
_HISTORY_FRACTION = 0.15  # share of training examples with one earlier exchange


@dataclass(frozen=True)
class ModelPreset:
    """Model size and training recipe for one demo-model flavour."""

    hidden_size: int
    """Width of the residual stream; ``hidden_size / 64`` attention heads."""
    num_layers: int
    """Number of transformer blocks."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    vocab_size: int
    """Cap on the byte-level BPE vocabulary, special tokens included (the corpus saturates near 1.7k)."""
    corpus_size: int
    """Number of synthetic dialogues to train on."""
    train_steps: int
    """Optimizer steps; the corpus is reshuffled and reused as needed."""
    batch_size: int
    """Sequences per optimizer step."""
    learning_rate: float
    """Peak AdamW learning rate."""
    warmup_steps: int
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_seq_len: int = 256
    """Training examples are truncated to this many tokens."""
    max_position_embeddings: int = 1024
    """Longest context the saved model accepts."""

    @property
    def num_heads(self) -> int:
        """Attention heads, fixed at head_dim 64."""
        return self.hidden_size // _HEAD_DIM

    def __post_init__(self) -> None:
        if self.hidden_size % _HEAD_DIM:
            raise ValueError(f"hidden_size must be a multiple of {_HEAD_DIM} (head_dim {_HEAD_DIM})")


PRESETS: dict[str, ModelPreset] = {
    "demo": ModelPreset(
        hidden_size=256,
        num_layers=4,
        intermediate_size=768,
        vocab_size=2048,
        corpus_size=7000,
        train_steps=260,
        batch_size=32,
        learning_rate=2e-3,
        warmup_steps=20,
    ),
    "tiny": ModelPreset(
        hidden_size=128,
        num_layers=2,
        intermediate_size=384,
        vocab_size=2048,
        corpus_size=800,
        train_steps=40,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=5,
    ),
}
"""Named presets: ``demo`` for real use, ``tiny`` for fast tests."""


@dataclass(frozen=True)
class _Example:
    """One tokenized training sequence."""

    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (everything but assistant replies)


@dataclass(frozen=True)
class QualityReport:
    """How a demo model's sampled replies classify on held-out prompts."""

    n: int
    """Number of prompts sampled."""
    on_topic_rate: float
    """Share of replies whose classified topic is the prompt's topic."""
    style_shares: dict[str, float]
    """Share of replies per classified style (``"none"`` for unclassifiable ones)."""
    eos_rate: float
    """Share of replies that ended with EOS before the token limit."""
    replies: list[str]
    """The decoded replies, in prompt order."""


def _resolve_preset(preset: str) -> ModelPreset:
    """Look a preset up by name with a helpful error."""
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown demo preset {preset!r}; choose from {sorted(PRESETS)}") from None


def config_hash(preset: str, seed: int) -> str:
    """Short hash of everything that determines the build: preset fields, seed, recipe and corpus."""
    # A corpus sample fingerprints the generator tables, so editing corpus.py invalidates caches.
    corpus_sample = [dataclasses.astuple(d) for d in generate_corpus(16, seed=seed)]
    payload = {
        "preset": preset,
        "fields": dataclasses.asdict(_resolve_preset(preset)),
        "seed": seed,
        "format": _BUILD_FORMAT,
        "corpus": corpus_sample,
        "held_out": [p.text for p in held_out_prompts()],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# --- 1. tokenizer -------------------------------------------------------------------------------


def _render(messages: Sequence[tuple[str, str]]) -> str:
    """The chat-template rendering of ``(role, content)`` messages, for tokenizer training."""
    return BOS + "".join(f"<|{role}|>{content}{EOS}" for role, content in messages)


def train_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it with special tokens and chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Like Llama, plain encoding prepends BOS; chat rendering carries its own and encodes without it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# --- 2. training examples -----------------------------------------------------------------------


def _conversations(corpus: Sequence[Dialogue], seed: int) -> list[list[tuple[str, str]]]:
    """Turn dialogues into message lists, some with a system prompt or an earlier exchange."""
    rng = random.Random(seed)
    conversations: list[list[tuple[str, str]]] = []
    for dialogue in corpus:
        messages: list[tuple[str, str]] = []
        if rng.random() < _SYSTEM_FRACTION:
            messages.append(("system", rng.choice(_SYSTEM_PROMPTS)))
        if rng.random() < _HISTORY_FRACTION:
            earlier = rng.choice(corpus)
            messages += [("user", earlier.prompt), ("assistant", earlier.reply)]
        messages += [("user", dialogue.prompt), ("assistant", dialogue.reply)]
        conversations.append(messages)
    return conversations


def _encode(tokenizer: PreTrainedTokenizerFast, messages: Sequence[tuple[str, str]], max_len: int) -> _Example:
    """Tokenize one conversation exactly as the chat template renders it; loss on assistant turns only."""
    eos_id = tokenizer.eos_token_id
    input_ids = [tokenizer.bos_token_id]
    labels = [-100]
    for role, content in messages:
        body = [*tokenizer.encode(content, add_special_tokens=False), eos_id]
        input_ids += [tokenizer.convert_tokens_to_ids(f"<|{role}|>"), *body]
        # Predicting the reply and its closing EOS is the whole job; prompts are context.
        labels += [-100, *(body if role == "assistant" else [-100] * len(body))]
    return _Example(input_ids=input_ids[:max_len], labels=labels[:max_len])


def _balanced_batches(
    examples: Sequence[_Example], groups: Sequence[str], batch_size: int, generator: torch.Generator
) -> Iterator[list[_Example]]:
    """Endless shuffled batches holding the same number of examples from every group, of similar lengths.

    Groups are the styles of the final replies. The style is chosen at a reply's first
    token, a single position per sequence, so its learned distribution is easily skewed
    by batches that over-represent a style; batching on raw length would make that
    systematic (concise replies are shorter). Equal shares per batch keep the
    style mix at ``1 / len(STYLES)``.
    """
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if batch_size % len(members):
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {len(members)} groups")
    share = batch_size // len(members)
    pool = share * 16  # sort lengths within pools of 16 batches: similar lengths, still random order
    if min(len(indices) for indices in members.values()) < share:
        raise ValueError(f"every group needs at least {share} examples")
    while True:
        lanes: list[list[int]] = []
        for indices in members.values():
            shuffled = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
            lane: list[int] = []
            for start in range(0, len(shuffled), pool):
                lane += sorted(shuffled[start : start + pool], key=lambda i: len(examples[i].input_ids))
            lanes.append(lane)
        n_batches = min(len(lane) for lane in lanes) // share
        for b in torch.randperm(n_batches, generator=generator).tolist():
            yield [examples[i] for lane in lanes for i in lane[b * share : (b + 1) * share]]


def _collate(batch: Sequence[_Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch into model inputs."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


# --- 3. model and training ----------------------------------------------------------------------


def _make_model(preset: ModelPreset, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised small Llama matching the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _lr_factor(step: int, preset: ModelPreset) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < preset.warmup_steps:
        return (step + 1) / preset.warmup_steps
    progress = (step - preset.warmup_steps) / max(1, preset.train_steps - preset.warmup_steps)
    return preset.min_lr_ratio + (1 - preset.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _train(
    model: LlamaForCausalLM,
    examples: Sequence[_Example],
    groups: Sequence[str],
    preset: ModelPreset,
    pad_id: int,
    seed: int,
    progress: bool,
) -> float:
    """Pretrain ``model`` in place; returns the mean loss over the last 10% of steps."""
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm gains are not decayed
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.learning_rate,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, preset))
    batches = _balanced_batches(examples, groups, preset.batch_size, torch.Generator().manual_seed(seed))
    tail = max(1, preset.train_steps // 10)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(preset.train_steps), desc="demo model", unit="step", disable=not progress)
    for _ in bar:
        loss = model(**_collate(next(batches), pad_id, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return sum(losses[-tail:]) / tail


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own save/load bars when the caller asked for no progress output."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- 4. build and cache -------------------------------------------------------------------------


def _build_into(out_dir: Path, preset_name: str, seed: int, progress: bool) -> None:
    """Build the model into an existing empty directory."""
    started = time.monotonic()
    preset = _resolve_preset(preset_name)
    corpus = generate_corpus(preset.corpus_size, seed=seed)
    conversations = _conversations(corpus, seed)
    tokenizer = train_tokenizer(
        [_render(c) for c in conversations], preset.vocab_size, preset.max_position_embeddings
    )
    examples = [_encode(tokenizer, c, preset.max_seq_len) for c in conversations]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):  # seed for determinism without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = _make_model(preset, tokenizer).to(device)
        styles = [d.style for d in corpus]
        final_loss = _train(model, examples, styles, preset, tokenizer.pad_token_id, seed, progress)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _hf_progress_bars(progress):
        model.to("cpu").save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp = {
        "preset": preset_name,
        "preset_config": dataclasses.asdict(preset),
        "seed": seed,
        "corpus_size": len(corpus),
        "config_hash": config_hash(preset_name, seed),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": round(final_loss, 5),
        "build_seconds": round(time.monotonic() - started, 2),
        "device": device.type,
    }
    (out_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    log.info("built demo model %s in %.1fs (final loss %.4f)", out_dir, stamp["build_seconds"], final_loss)


def build_demo_model(out_dir: str | Path, preset: str = "demo", seed: int = 0, progress: bool = True) -> Path:
    """Build the demo model into ``out_dir``, replacing what is there, and return its path.

    The build happens in a sibling temporary directory that is renamed into
    place, so readers never see a half-written model.
    """
    _resolve_preset(preset)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        _build_into(tmp, preset, seed, progress)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _stamp_matches(model_dir: Path, expected_hash: str) -> bool:
    """Whether ``model_dir`` holds a finished build with the expected config hash."""
    try:
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("config_hash") == expected_hash


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (blocks until free)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_model(cache_dir: str | Path, preset: str = "demo", seed: int = 0, progress: bool = True) -> Path:
    """Return ``cache_dir/<preset>-<confighash>``, building it first unless a matching build is there.

    A file lock makes concurrent callers wait for one build instead of racing.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(preset, seed)
    model_dir = cache_dir / f"{preset}-{digest}"
    if _stamp_matches(model_dir, digest):
        return model_dir
    with _file_lock(cache_dir / f"{preset}-{digest}.lock"):
        if not _stamp_matches(model_dir, digest):  # another process may have built it while we waited
            build_demo_model(model_dir, preset=preset, seed=seed, progress=progress)
    return model_dir


# --- 5. evaluation ------------------------------------------------------------------------------


def _sample(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    temperature: float,
    max_new_tokens: int,
) -> tuple[list[str], list[bool]]:
    """Sample one reply per prompt; returns texts and whether each ended with EOS."""
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tokenizer.padding_side = "left"  # generation continues from the right edge
    inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new)
    ended = [tokenizer.eos_token_id in row.tolist() for row in new_tokens]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True), ended


def evaluate_demo_model(
    model_dir: str | Path,
    n_prompts: int | None = 60,
    temperature: float = 0.7,
    max_new_tokens: int = 96,
    seed: int = 0,
) -> QualityReport:
    """Sample replies to held-out prompts and report topic accuracy, style mix and EOS rate.

    ``n_prompts=None`` uses every held-out prompt. Sampling is plain temperature
    sampling (no top-k / top-p), seeded by ``seed``.
    """
    with _hf_progress_bars(False):
        model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    prompts = held_out_prompts(n_prompts, seed=seed)
    torch.manual_seed(seed)
    replies, ended = _sample(model, tokenizer, [p.text for p in prompts], temperature, max_new_tokens)
    labels = [classify(r) for r in replies]
    styles = [label.style or "none" for label in labels]
    n = len(prompts)
    return QualityReport(
        n=n,
        on_topic_rate=sum(label.topic == p.topic for label, p in zip(labels, prompts, strict=True)) / n,
        style_shares={s: styles.count(s) / n for s in sorted(set(styles))},
        eos_rate=sum(ended) / n,
        replies=replies,
    )
