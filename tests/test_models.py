"""Which model alignd serves: bad model paths stop the start with the file and the reason, and a ``.gguf`` file is
converted once (cached by its hash) into a folder that transformers and vLLM load, chat template included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignd.models import ModelError, check_model, convert_gguf


def _write_gguf(path: Path, architecture: str) -> Path:
    """A small but well-formed GGUF file of the given architecture (one tensor, no weights to speak of)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("case", "reason"), [
    ("missing", "does not exist"),
    ("not gguf", "is not a GGUF file"),
    ("truncated", "is not a readable GGUF file"),
    ("unsupported architecture", "which transformers cannot load from GGUF"),
    ("folder without config", "has no config.json"),
    ("plain file", "is a file but not a .gguf file"),
    ("missing folder", "does not exist"),
])
def test_a_model_that_cannot_be_served_is_refused_naming_it(tmp_path: Path, case: str, reason: str) -> None:
    model = {
        "missing": tmp_path / "absent.gguf",
        "not gguf": tmp_path / "text.gguf",
        "truncated": tmp_path / "cut.gguf",
        "unsupported architecture": tmp_path / "odd.gguf",
        "folder without config": tmp_path / "folder",
        "plain file": tmp_path / "weights.bin",
        "missing folder": tmp_path / "no" / "such" / "folder",
    }[case]
    if case == "not gguf":
        model.write_text("hello")
    elif case == "truncated":
        _write_gguf(tmp_path / "whole.gguf", "llama")
        model.write_bytes((tmp_path / "whole.gguf").read_bytes()[:40])
    elif case == "unsupported architecture":
        _write_gguf(model, "nonesuch")
    elif case == "folder without config":
        model.mkdir()
    elif case == "plain file":
        model.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError) as caught:
        check_model(str(model))
    assert str(model) in str(caught.value) and reason in str(caught.value)


def test_hub_ids_pass_the_check() -> None:
    check_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # vLLM resolves it (offline here: it would fail later)
    check_model("gpt2")


def test_serve_stops_at_once_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    result = subprocess.run([sys.executable, "-m", "alignd.cli", "serve", "--model", str(bad), "--data-dir",
                             str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"model file {bad} is not a GGUF file" in result.stderr
    assert not (tmp_path / "data" / "alignd.db").exists(), "nothing was opened for a model that cannot be served"


def test_gguf_is_converted_once_into_a_loadable_folder(smollm2_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder = convert_gguf(smollm2_gguf, tmp_path, progress=False)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")
    manifest = json.loads((folder / "alignd-gguf.json").read_text())
    assert manifest["architecture"] == "llama" and manifest["source"] == str(smollm2_gguf.resolve())
    # Cached by the file's hash: the second resolve finds the folder and writes nothing.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(smollm2_gguf, tmp_path, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


ADMIN = "smol-admin"


@pytest.fixture(scope="module")
def smollm2_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``alignd serve --model <file>.gguf``: converts, then serves SmolLM2-135M-Instruct with vLLM; a small training
    budget for the end-to-end run (the trigger is manual)."""
    from tests.test_serve_process import _free_port, _wait_ready

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ALIGND_KV_CACHE_SPACE_GIB": "1", "ALIGND_MAX_MODEL_LEN": "1024"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignd.cli", "serve", "--model", str(smollm2_gguf), "--data-dir",
         str(tmp_path_factory.mktemp("smollm2")), "--port", str(port), "--admin-key", ADMIN,
         "--training-trigger", "manual", "--ppo-iterations", "1", "--rollout-batch-size", "4",
         "--max-new-tokens", "32", "--reward-model-confidence", "0", "--trainer-threads", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, proc, timeout=400)
        yield url
    finally:
        proc.terminate()
        proc.wait(120)


def test_smollm2_served_from_its_gguf_file_chats_with_its_template(smollm2_server: str) -> None:
    """The real-model tier: the instruct model answers through its own chat template."""
    import httpx

    body = {"model": "alignd", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is the capital of France?"}]}
    reply = httpx.post(f"{smollm2_server}/v1/chat/completions", json=body, timeout=120).json()
    text = reply["choices"][0]["message"]["content"]
    assert "Paris" in text, text  # a real instruct model answers; a mis-rendered template would not
    assert reply["system_fingerprint"] == "policy-0"
    assert reply["usage"]["prompt_tokens"] > 20  # the template's system and role markers were rendered


def test_simulated_users_judge_smollm2_replies_by_a_trait(smollm2_server: str) -> None:
    """Users who prefer a rule-checked trait (the real-model benchmark's users) on the real model's replies: every
    stored event follows the rules, checked again from the stored replies."""
    from alignd.clients import Client
    from alignd.clients.simulate import labeller, prompt_pool, run_simulation
    from tests.test_simulate import assert_follows_the_rules

    topics = {p.text: p for p in prompt_pool("training", "exclaims")}
    with Client(smollm2_server, timeout=120) as client:
        report = run_simulation(client, prefer="exclaims", requests=6, seed=3, concurrency=2, max_tokens=32)
    with Client(smollm2_server, api_key=ADMIN, timeout=120) as admin:
        events = [e for e in admin.export("events") if e["user"].startswith("sim-")]
    assert report.requests == 6 and report.failed == 0 and len(events) == 6
    label = labeller("exclaims")
    for event in events:
        prompt = topics[event["prompt"][0]["content"]]  # an everyday prompt of the training side
        assert_follows_the_rules(event, [label(text, prompt) for text in event["choices"]], prompt.topic, "exclaims")
    assert report.versions["policy-0"].replies == sum(len(e["choices"]) for e in events)


def test_smollm2_trains_end_to_end(smollm2_server: str) -> None:
    """Feedback on SmolLM2's replies, one short run in its own process (reward model, normalisation, PPO with
    rollouts from the serving engine, gate), and a registered version that the engine loads and serves."""
    import httpx

    admin = {"Authorization": f"Bearer {ADMIN}"}
    for n, topic in enumerate(["the moon", "tea", "bicycles", "rain", "chess", "bread", "owls", "maps"] * 2):
        r = httpx.post(f"{smollm2_server}/v1/chat/completions", timeout=120, json={
            "model": "alignd", "n": 2, "temperature": 1.0, "max_tokens": 32,
            "messages": [{"role": "user", "content": f"Tell me one fact about {topic}."}]})
        assert r.status_code == 200, r.text
        fb = httpx.post(f"{smollm2_server}/v1/feedback", timeout=30,
                        json={"completion_id": r.json()["id"], "kind": "pairwise", "winner": n % 2})
        assert fb.status_code == 201, fb.text
    run = httpx.post(f"{smollm2_server}/v1/training/runs", headers=admin, json={"promote": False}, timeout=30).json()
    deadline = time.monotonic() + 900
    while run["status"] == "running" and time.monotonic() < deadline:
        time.sleep(2)
        run = httpx.get(f"{smollm2_server}/v1/training/runs/{run['id']}", headers=admin, timeout=30).json()
    assert run["status"] == "succeeded", run["error"]
    metrics = run["metrics"]
    assert metrics["data"]["train_pairs"] > 0 and metrics["data"]["length_cap"] <= 32
    assert len(metrics["ppo"]) == 1 and metrics["ppo"][0]["response_length"] > 0
    assert "length_controlled_gain" in metrics["gate"] and metrics["kl_controller"]["kl_coef"] > 0
    version = run["candidate"]
    promoted = httpx.post(f"{smollm2_server}/v1/policies/{version}/promote", headers=admin, timeout=120)
    assert promoted.status_code == 200, promoted.text
    reply = httpx.post(f"{smollm2_server}/v1/chat/completions", timeout=120, json={
        "model": "alignd", "max_tokens": 16, "messages": [{"role": "user", "content": "Hello!"}]}).json()
    assert reply["system_fingerprint"] == f"policy-{version}" and reply["choices"][0]["message"]["content"]
