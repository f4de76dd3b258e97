"""Tests for the offline demo model: corpus, classifier, deterministic build, cache, quality bar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

from alignd.demo import build
from alignd.demo.build import build_demo_model, config_hash, ensure_demo_model, evaluate_demo_model
from alignd.demo.corpus import (
    STYLES,
    TOPICS,
    Label,
    classify,
    generate_corpus,
    held_out_prompts,
    topic_of,
    training_prompts,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``tiny`` build shared by this module's structural tests."""
    return build_demo_model(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", progress=False)


# --- corpus and classifier ----------------------------------------------------------------------


def test_corpus_is_deterministic_per_seed() -> None:
    assert generate_corpus(300, seed=0) == generate_corpus(300, seed=0)
    assert generate_corpus(300, seed=0) != generate_corpus(300, seed=1)
    assert training_prompts(100, seed=3) == training_prompts(100, seed=3)
    assert held_out_prompts(40, seed=3) == held_out_prompts(40, seed=3)


def test_corpus_covers_every_topic_and_style() -> None:
    corpus = generate_corpus(2000, seed=0)
    for topic in TOPICS:
        assert sum(d.topic == topic for d in corpus) > 2000 / len(TOPICS) / 2
    for style in STYLES:
        assert sum(d.style == style for d in corpus) > 2000 / len(STYLES) / 2


def test_held_out_prompts_never_appear_in_training() -> None:
    held_out = {p.text for p in held_out_prompts()}
    assert len(held_out) >= 100
    assert {p.topic for p in held_out_prompts()} == set(TOPICS)
    for seed in (0, 1, 2):
        assert not held_out & {d.prompt for d in generate_corpus(5000, seed=seed)}
        assert not held_out & {p.text for p in training_prompts(5000, seed=seed)}


def test_held_out_sample_is_distinct_and_capped() -> None:
    sample = held_out_prompts(50, seed=1)
    assert len({p.text for p in sample}) == 50
    assert len(held_out_prompts(10**6)) == len(held_out_prompts())


def test_classifier_labels_corpus_replies() -> None:
    corpus = generate_corpus(3000, seed=7)
    correct = sum(classify(d.reply) == Label(topic=d.topic, style=d.style) for d in corpus)
    assert correct / len(corpus) >= 0.99
    assert all(topic_of(p.text) == p.topic for p in held_out_prompts())


def test_classifier_returns_none_for_unrelated_text() -> None:
    for text in (
        "",
        "The quarterly tax report is due on Friday afternoon.",
        "My cat sleeps on the sofa all day.",
        "Interest rates went up again this month.",
    ):
        assert classify(text).topic is None, text
        assert topic_of(text) is None, text
    assert classify("").style is None


def test_corpus_module_does_not_import_torch() -> None:
    code = "import sys, alignd.demo.corpus; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- build ----------------------------------------------------------------------------------------


def test_tiny_build_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again", preset="tiny", progress=False)
    first, second = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert tensor.equal(second[name]), name
    assert (tiny_model_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_saved_model_is_a_loadable_llama(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.tie_word_embeddings
    assert config.max_position_embeddings >= 512
    # The corpus' word inventory saturates BPE below the preset's cap: every corpus word is one token.
    assert 1000 <= len(tokenizer) <= build.PRESETS["tiny"].vocab_size
    assert GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id == tokenizer.eos_token_id
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    stamp = json.loads((tiny_model_dir / build.STAMP_FILE).read_text())
    assert stamp["preset"] == "tiny" and stamp["seed"] == 0
    assert stamp["config_hash"] == config_hash("tiny", 0)
    assert {"corpus_size", "final_loss", "build_seconds"} <= stamp.keys()


def test_chat_template_matches_training_encoding(tiny_model_dir: Path) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    messages = [("system", "You are a helpful assistant."), ("user", "Any tips on making soup?"), ("assistant", "Hi!")]
    chat = [{"role": role, "content": content} for role, content in messages]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == (
        "<|bos|><|system|>You are a helpful assistant.<|eos|><|user|>Any tips on making soup?<|eos|>"
        "<|assistant|>Hi!<|eos|>"
    )
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert list(ids) == build._encode(tokenizer, messages, max_len=1024).input_ids
    prompt = tokenizer.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|eos|><|assistant|>")


def test_ensure_demo_model_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_demo_model(tmp_path, preset="tiny", progress=False)
    assert first == tmp_path.resolve() / f"tiny-{config_hash('tiny', 0)}"
    stamp_mtime = (first / build.STAMP_FILE).stat().st_mtime_ns

    def no_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("ensure_demo_model rebuilt a cached model")

    monkeypatch.setattr(build, "build_demo_model", no_rebuild)
    assert ensure_demo_model(tmp_path, preset="tiny", progress=False) == first
    assert (first / build.STAMP_FILE).stat().st_mtime_ns == stamp_mtime


def test_unknown_preset_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo preset"):
        ensure_demo_model(tmp_path, preset="huge")


# --- quality bar ------------------------------------------------------------------------------------


def test_demo_model_meets_quality_bar(demo_model_dir: Path) -> None:
    report = evaluate_demo_model(demo_model_dir, n_prompts=96, temperature=0.7, seed=0)
    assert report.n == 96
    assert report.on_topic_rate >= 0.8, report.replies
    for style in STYLES:
        assert report.style_shares.get(style, 0.0) >= 0.10, report.style_shares
    assert report.eos_rate >= 0.9
