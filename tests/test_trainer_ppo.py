"""PPO on the tiny demo model: log-prob recomputation, the critic's start, rollouts through an engine, a short run
that raises the reward model's score within the KL budget, and the gate's verdict on it."""

from __future__ import annotations

import ast
import asyncio
import json
import math
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from alignd.demo.corpus import generate_corpus, held_out_prompts, training_prompts
from alignd.engine.types import ChoiceDelta, GenerationStep
from alignd.protocol import SamplingOptions
from alignd.store.records import PreferencePair
from alignd.trainer.config import (
    AdapterConfig,
    GateConfig,
    PPOConfig,
    RewardConfig,
    TrainerConfig,
    scale_batches_to_model,
    scale_to_model,
)
from alignd.trainer.gate import DECISION_FILE, Scorer, decide, evaluate, save_decision
from alignd.trainer.models import ADAPTER_WEIGHTS, POLICY, REWARD, ModelStack, load_stack
from alignd.trainer.ppo import _accumulate, init_critic, make_experience, run_ppo
from alignd.trainer.reward_model import (
    RewardNormalization,
    fit_normalization,
    score_with_features,
    train_reward_model,
)
from alignd.trainer.rollout import (
    ROLLOUT_VERSION,
    HFRollouts,
    Sampling,
    VLLMRollouts,
    collate_rollouts,
    encode_prompt,
    make_rollout_backend,
    policy_logprobs,
)
from tests.style_adapters import ranking_pairs, user

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared two-core machine run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt_ids(stack: ModelStack, texts: list[str]) -> list[list[int]]:
    return [encode_prompt(stack.tokenizer, user(text), 128) for text in texts]


@pytest.fixture(scope="module")
def config() -> TrainerConfig:
    return TrainerConfig(
        ppo=PPOConfig(iterations=6, rollout_batch_size=32, max_new_tokens=48, epochs=2, minibatch_size=8,
                      rollout_backend="hf"),
        gate=GateConfig(n_prompts=48, max_new_tokens=48),
        device="cpu",
    )


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, config: TrainerConfig) -> ModelStack:
    """The tiny model with a reward model for the planted style ranking; the policy adapter is still fresh."""
    stack = load_stack(tiny_model_dir, config)
    figures = train_reward_model(stack, ranking_pairs(400, seed=5), RewardConfig(epochs=2), config.lora)
    assert figures.heldout_accuracy is not None and figures.heldout_accuracy >= 0.9
    return stack


@pytest.fixture(scope="module")
def normalization(stack: ModelStack, config: TrainerConfig) -> RewardNormalization:
    torch.manual_seed(1)
    reference = HFRollouts().generate(stack, prompt_ids(stack, [p.text for p in training_prompts(64, seed=1)]),
                                      None, Sampling(1.0, config.ppo.max_new_tokens))
    return fit_normalization(stack, reference)


def test_recomputed_logprobs_match_the_sampling_distribution(tiny_model_dir: Path) -> None:
    """Log-probs recomputed from logits / T (left-padded prompts, right-padded replies) equal generate's own."""
    stack = ModelStack.load(tiny_model_dir, AdapterConfig(r=4), torch.device("cpu"), torch.float32)
    prompts = prompt_ids(stack, ["Can you tell me about black holes?", "Any tips on baking cookies?", "Hi"])
    rollouts = HFRollouts().generate(stack, prompts, None, Sampling(temperature=0.7, max_new_tokens=12))
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    prompt_width = sequences.shape[1] - action_mask.shape[1]
    torch.manual_seed(0)
    with stack.use(None), torch.no_grad():
        out = stack.causal_lm.generate(
            input_ids=sequences[:, :prompt_width], attention_mask=attention_mask[:, :prompt_width], do_sample=True,
            temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=12, output_scores=True, return_dict_in_generate=True,
            pad_token_id=stack.tokenizer.pad_token_id, eos_token_id=stack.tokenizer.eos_token_id,
        )
        tokens = out.sequences[:, prompt_width:]  # (B, R)
        expected = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, tokens.unsqueeze(-1))[..., 0]
        full_mask = torch.cat([attention_mask[:, :prompt_width], torch.ones_like(tokens)], 1)
        recomputed = policy_logprobs(stack, out.sequences, full_mask, tokens.shape[1], temperature=0.7)
        with stack.use(POLICY):  # a fresh adapter is a no-op
            fresh = policy_logprobs(stack, out.sequences, full_mask, tokens.shape[1], temperature=0.7)
    valid = torch.isfinite(expected)  # generate pads finished rows; those positions are not compared
    torch.testing.assert_close(recomputed[valid], expected[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh, recomputed)


def test_critic_starts_as_the_normalised_reward_model(stack: ModelStack) -> None:
    normalization = RewardNormalization(mean=1.5, std=4.0)
    critic = init_critic(stack, normalization)
    rollouts = HFRollouts().generate(stack, prompt_ids(stack, ["Any tips on growing tomatoes?", "Hi"]), None,
                                     Sampling(1.0, 8))
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    response_len = action_mask.shape[1]
    with torch.no_grad():
        with stack.use(REWARD):
            reward = stack.head_outputs(REWARD, sequences, attention_mask)  # (B, L)
        scores, features = score_with_features(stack, sequences, attention_mask, normalization, response_len)
        values = critic(features)  # (B, R)
    # V(s_t) is the normalised reward model read where a_t is predicted; the score is read at the last token.
    torch.testing.assert_close(values, ((reward - 1.5) / 4.0)[:, -response_len - 1 : -1], atol=1e-5, rtol=1e-5)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
    torch.testing.assert_close(scores, (reward.gather(1, last[:, None])[:, 0] - 1.5) / 4.0, atol=1e-5, rtol=1e-5)


def test_short_ppo_run_raises_reward_within_kl_budget(
    stack: ModelStack, normalization: RewardNormalization, config: TrainerConfig, tmp_path: Path
) -> None:
    train = prompt_ids(stack, [p.text for p in training_prompts(200, seed=1)])
    heldout = prompt_ids(stack, [p.text for p in held_out_prompts(config.gate.n_prompts, seed=2)])
    backend = HFRollouts()
    history = run_ppo(stack, backend, train, normalization, config).history
    evaluation = evaluate(stack, backend, heldout, POLICY, None, Scorer(REWARD, normalization), config.gate, seed=3)
    decision = decide(evaluation, config.gate)
    candidate, current = decision.candidate, decision.current
    report = {"first": asdict(history[0]), "last": asdict(history[-1]), "decision": decision.to_dict()}
    print(json.dumps(report, indent=1))  # figures for the record (pytest -s)

    assert len(history) == config.ppo.iterations
    for stats in history:
        assert all(math.isfinite(v) for k, v in asdict(stats).items() if isinstance(v, float)), stats
        assert stats.tokens_per_s > 0 and set(stats.seconds) == {"rollout", "experience", "update"}
    assert history[0].kl == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the untouched policy
    assert history[-1].reward > history[0].reward
    assert candidate.mean_reward > current.mean_reward + 0.2, decision  # the reward model's own score rose
    assert 0 < candidate.kl <= config.gate.kl_budget
    assert decision.promote, decision.reason
    assert decision.gain_lower is not None and decision.gain_lower > config.gate.margin

    folder = stack.save_adapter(POLICY, tmp_path / "candidate")
    save_decision(folder, decision)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", ADAPTER_WEIGHTS, DECISION_FILE]
    assert json.loads((folder / DECISION_FILE).read_text())["promote"] is True


def test_saved_policy_reloads_to_the_same_distribution(tiny_model_dir: Path, tmp_path: Path) -> None:
    stack = ModelStack.load(tiny_model_dir, AdapterConfig(r=4), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, param in stack.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.normal_(std=0.05)  # a policy that differs from the base
    folder = stack.save_adapter(POLICY, tmp_path / "policy")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    stack.load_adapter("current", folder)
    rollouts = HFRollouts().generate(stack, prompt_ids(stack, ["Any tips on baking bread?"]), POLICY, Sampling(1, 8))
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    logprobs = {}
    with torch.no_grad():
        for adapter in (POLICY, "current", None):
            with stack.use(adapter):
                logprobs[adapter] = policy_logprobs(stack, sequences, attention_mask, action_mask.shape[1], 1.0)
    torch.testing.assert_close(logprobs["current"], logprobs[POLICY])
    assert not torch.allclose(logprobs[None], logprobs[POLICY])


def test_time_limit_ends_the_run_after_the_current_iteration(tiny_model_dir: Path) -> None:
    config = TrainerConfig(ppo=PPOConfig(iterations=5, rollout_batch_size=4, minibatch_size=2, max_new_tokens=6,
                                         time_limit_s=0.0, rollout_backend="hf"))
    stack = ModelStack.load(tiny_model_dir, config.lora, torch.device("cpu"), torch.float32)
    stack.add_adapter(REWARD, config.lora, head=True)
    result = run_ppo(stack, HFRollouts(), prompt_ids(stack, ["Hi", "Any tips on comets?"]), RewardNormalization(),
                     config)
    assert [s.iteration for s in result.history] == [0]
    assert result.stopped is not None and "time limit" in result.stopped


def test_bfloat16_base_trains_float32_adapters(tiny_model_dir: Path) -> None:
    """The CUDA configuration's dtype handling, exercised on the CPU: bf16 base, fp32 adapters and heads."""
    config = TrainerConfig(dtype="bfloat16", device="cpu", ppo=PPOConfig(
        iterations=2, rollout_batch_size=4, minibatch_size=2, max_new_tokens=8, rollout_backend="hf"))
    stack = load_stack(tiny_model_dir, config)
    stack.add_adapter(REWARD, config.lora, head=True)
    history = run_ppo(stack, make_rollout_backend(config.ppo.rollout_backend), prompt_ids(stack, ["Hi", "Any tips?"]),
                      RewardNormalization(), config).history
    assert stack.causal_lm.get_input_embeddings().weight.dtype == torch.bfloat16
    for role in (POLICY, REWARD):
        assert {p.dtype for p in stack.role_parameters(role)} == {torch.float32}, role
    assert all(math.isfinite(s.policy_loss) and math.isfinite(s.value_loss) for s in history)
    trained = [p for n, p in stack.model.named_parameters() if ".policy." in n and "lora_B" in n]
    assert any(bool(p.abs().sum() > 0) for p in trained)  # the policy moved off its no-op init


# --- rollouts through the serving engine's API --------------------------------------------------------------


class FakeEngine:
    """The engine's policy and generation API; replies depend on the prompt length, as a stand-in for a model."""

    EOS = 1

    def __init__(self) -> None:
        self.loaded: dict[int, Path] = {}
        self.events: list[tuple[str, int]] = []
        self.seen_folders: list[tuple[Path, list[str]]] = []
        self.requests: list[tuple[str, int, SamplingOptions]] = []
        self.loop_thread: list[str] = []

    async def load_policy(self, version: int, adapter_dir: str | Path) -> None:
        folder = Path(adapter_dir)
        names = await asyncio.to_thread(lambda: sorted(p.name for p in folder.iterdir()))
        self.seen_folders.append((folder, names))
        self.loaded[version] = folder
        self.events.append(("load", version))
        self.loop_thread.append(threading.current_thread().name)

    async def unload_policy(self, version: int) -> None:
        self.loaded.pop(version, None)
        self.events.append(("unload", version))

    async def generate(self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str,
                       policy_version: int = 0, *, stream: bool = False) -> AsyncIterator[GenerationStep]:
        assert not stream and (policy_version == 0 or policy_version in self.loaded)
        self.requests.append((request_id, policy_version, options))
        await asyncio.sleep(0)
        if len(prompt_token_ids) % 3 == 0:
            ids, reason = [11, 12, self.EOS], "stop"
        elif len(prompt_token_ids) % 3 == 1:
            ids, reason = [13] * options.max_tokens, "length"
        else:
            ids, reason = [14], "stop"  # a stop token other than EOS ended it
        yield GenerationStep(choices=[ChoiceDelta(index=0, text="", token_ids=ids, finish_reason=reason)],
                             finished=True)


@pytest.fixture
def engine_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in another thread, like the server's engine loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-engine-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_vllm_rollouts_load_a_fresh_adapter_under_the_hidden_version(
    tiny_model_dir: Path, engine_loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    stack = ModelStack.load(tiny_model_dir, AdapterConfig(r=4), torch.device("cpu"), torch.float32)
    engine = FakeEngine()
    FakeEngine.EOS = stack.tokenizer.eos_token_id
    backend = make_rollout_backend("vllm", engine, loop=engine_loop, workdir=tmp_path)
    assert isinstance(backend, VLLMRollouts) and isinstance(make_rollout_backend("hf"), HFRollouts)
    prompts = [[0, 4, 5], [0, 4, 5, 6], [0, 4, 5, 6, 7]]
    sampling = Sampling(temperature=0.8, max_new_tokens=5)

    first = backend.generate(stack, prompts, POLICY, sampling)
    second = backend.generate(stack, prompts, POLICY, sampling)
    base = backend.generate(stack, prompts, None, sampling)

    eos = stack.tokenizer.eos_token_id
    # Exactly the tokens sampled: a reply that stopped on another stop token gets no EOS appended.
    assert [(r.response_ids, r.ended) for r in first] == [([11, 12, eos], True), ([13] * 5, False), ([14], True)]
    assert first == second == base
    assert engine.events == [("load", ROLLOUT_VERSION), ("unload", ROLLOUT_VERSION)] * 2  # the base needs no load
    assert engine.loop_thread == ["fake-engine-loop"] * 2
    (folder1, files1), (folder2, files2) = engine.seen_folders
    assert folder1 != folder2 and files1 == files2 == ["adapter_config.json", ADAPTER_WEIGHTS]
    assert not list(tmp_path.iterdir())  # temporary adapter folders are gone after each iteration
    versions = [version for _, version, _ in engine.requests]
    assert versions == [ROLLOUT_VERSION] * 6 + [0] * 3
    assert len({request_id for request_id, _, _ in engine.requests}) == 9
    options = engine.requests[0][2]
    assert (options.temperature, options.max_tokens, options.top_p, options.top_k, options.n) == (0.8, 5, 1.0, 0, 1)


def test_importing_the_trainer_imports_neither_torch_nor_vllm() -> None:
    # The package itself (config) is light; the engine-facing modules it leans on must not pull vLLM in either.
    code = (
        "import sys, alignd.trainer, alignd.protocol, alignd.engine.types; "
        "assert 'torch' not in sys.modules, 'torch'; assert 'vllm' not in sys.modules, 'vllm'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    # No trainer module imports vLLM, even lazily: rollouts reach it only through the engine object they are given.
    for path in (REPO / "server" / "trainer").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "vllm"], path


def test_kl_past_the_budget_stops_ppo_with_the_last_policy_within_it(tiny_model_dir: Path) -> None:
    """With a budget of almost no KL, the second iteration's rollouts are past it: PPO stops there and the policy is
    the one that generated the first iteration's (in-budget) rollouts, not the one the first update made."""
    config = TrainerConfig(ppo=PPOConfig(iterations=4, rollout_batch_size=8, minibatch_size=4, max_new_tokens=8,
                                         rollout_backend="hf", learning_rate=5e-2, init_kl_coef=0.0))
    config.gate.kl_budget = 1e-6
    stack = ModelStack.load(tiny_model_dir, config.lora, torch.device("cpu"), torch.float32)
    stack.add_adapter(REWARD, config.lora, head=True)
    stack.add_adapter(POLICY, config.lora)
    start = stack.adapter_state(POLICY)
    result = run_ppo(stack, HFRollouts(), prompt_ids(stack, ["Hi", "Any tips on comets?"]), RewardNormalization(),
                     config, kl_coef=0.02)
    assert len(result.history) == 1 and result.history[0].kl_coef == 0.02  # β carried in, not init_kl_coef
    assert result.stopped is not None and "passed the budget" in result.stopped
    assert all(torch.equal(start[k], v) for k, v in stack.adapter_state(POLICY).items())


def test_micro_batches_accumulate_the_minibatch_gradient(tiny_model_dir: Path) -> None:
    config = TrainerConfig(ppo=PPOConfig(rollout_batch_size=6, max_new_tokens=8))
    stack = ModelStack.load(tiny_model_dir, config.lora, torch.device("cpu"), torch.float32)
    stack.add_adapter(REWARD, config.lora, head=True)
    stack.add_adapter(POLICY, config.lora)
    torch.manual_seed(0)
    rollouts = HFRollouts().generate(stack, prompt_ids(stack, ["Hi", "Tips?", "Comets?"]) * 2, POLICY,
                                     Sampling(1.0, 8))
    critic = init_critic(stack, RewardNormalization())
    with torch.no_grad():  # move the policy so that the ratios, and so the gradients, are not trivial
        for name, param in stack.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.normal_(std=0.01)
    experience = make_experience(stack, critic, rollouts, RewardNormalization(), 0.05, config.ppo)
    rows = torch.arange(len(experience))
    grads = []
    for micro in (None, 1, 4):
        config.ppo.micro_batch_size = micro
        stack.model.zero_grad(set_to_none=True)
        critic.zero_grad(set_to_none=True)
        _accumulate(stack, critic, experience, rows, config.ppo)
        grads.append(torch.cat([p.grad.flatten() for p in stack.role_parameters(POLICY) + list(critic.parameters())
                                if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.allclose(grads[0], grads[2], rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_on_float32_weights_matches_float32(tiny_model_dir: Path) -> None:
    """CPU autocast (what ``--trainer-dtype auto`` picks on a CPU with bfloat16 instructions): float32 weights and
    adapters, bfloat16 matmuls; log-probs agree with float32 to bfloat16's precision, and a backward pass reaches the
    float32 adapter."""
    stack = ModelStack.load(tiny_model_dir, AdapterConfig(r=4), torch.device("cpu"), torch.float32)
    prompts = prompt_ids(stack, ["Hi", "Any tips on comets?"])
    torch.manual_seed(0)
    rollouts = HFRollouts().generate(stack, prompts, POLICY, Sampling(1.0, 8))
    sequences, attention_mask, action_mask = collate_rollouts(rollouts, stack.tokenizer.pad_token_id, stack.device)
    with stack.use(POLICY):
        exact = policy_logprobs(stack, sequences, attention_mask, action_mask.shape[1], 1.0)
        stack.autocast = True
        fast = policy_logprobs(stack, sequences, attention_mask, action_mask.shape[1], 1.0)
        (fast * action_mask).sum().backward()
    assert fast.dtype == torch.float32
    assert torch.allclose(exact * action_mask, fast * action_mask, atol=0.1)
    grads = [p.grad for p in stack.role_parameters(POLICY) if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_the_kl_controller_holds_kl_near_its_target_on_the_demo_model(demo_model_dir: Path) -> None:
    """On the demo model with a reward model for its style axis: once KL has come near the target (the policy had
    to move first), the iterations stay within ±50% of it in the median, never far above it, and β follows KL."""
    target = 0.5
    config = TrainerConfig(ppo=PPOConfig(iterations=14, rollout_batch_size=32, max_new_tokens=48, epochs=2,
                                         minibatch_size=8, rollout_backend="hf", target_kl=target),
                           gate=GateConfig(kl_budget=100.0), device="cpu", dtype="float32")
    torch.set_num_threads(1)  # a fixed thread count: the same numbers every run
    stack = load_stack(demo_model_dir, config)
    train_reward_model(stack, ranking_pairs(400, seed=5), RewardConfig(epochs=2), config.lora)
    torch.manual_seed(1)
    reference = HFRollouts().generate(stack, prompt_ids(stack, [p.text for p in training_prompts(64, seed=1)]),
                                      None, Sampling(1.0, 48))
    result = run_ppo(stack, HFRollouts(), prompt_ids(stack, [p.text for p in training_prompts(200, seed=1)]),
                     fit_normalization(stack, reference), config)
    kls = [h.kl for h in result.history]
    print([round(k, 2) for k in kls], [round(h.kl_coef, 3) for h in result.history])
    engaged = next(i for i, kl in enumerate(kls) if kl >= target / 2)
    after = sorted(kls[engaged:])
    assert len(after) >= 4, kls
    assert 0.5 * target <= after[len(after) // 2] <= 1.5 * target, kls  # the median
    assert max(after) <= 2.5 * target, kls
    assert result.history[-1].kl_coef > config.ppo.init_kl_coef  # β rose to hold KL down


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        config = TrainerConfig(dtype="float32", device="cpu", gradient_checkpointing=checkpointing)
        stack = load_stack(tiny_model_dir, config)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in stack.model.named_parameters():
                if ".policy." in name and "lora_B" in name:
                    param.normal_(std=0.01)
        sequences = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
        with stack.use(POLICY):
            policy_logprobs(stack, sequences, torch.ones_like(sequences), 3, 1.0).sum().backward()
        assert stack.causal_lm.is_gradient_checkpointing == checkpointing
        grads.append(torch.cat([p.grad.flatten() for p in stack.role_parameters(POLICY) if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_learning_rates_follow_the_model_size() -> None:
    config = TrainerConfig()
    assert scale_to_model(config, 1_000_000) == 1.0 and config.ppo.learning_rate == PPOConfig().learning_rate
    assert scale_to_model(TrainerConfig(), 135_000_000) == 1.0, "the defaults hold up to SmolLM2-135M"
    config = TrainerConfig()
    factor = scale_to_model(config, 1_000_000_000)
    assert factor == pytest.approx((135 / 1000) ** 0.25) and 0.6 < factor < 0.62
    assert config.ppo.learning_rate == pytest.approx(PPOConfig().learning_rate * factor)
    assert config.reward.learning_rate == pytest.approx(RewardConfig().learning_rate * factor)


def test_sequences_per_pass_follow_the_model_size() -> None:
    sizes = {}
    for parameters in (3_800_000, 135_000_000, 1_000_000_000, 7_000_000_000):
        config = TrainerConfig()
        sizes[parameters] = scale_batches_to_model(config, parameters)
        assert (config.ppo.micro_batch_size, config.ppo.forward_batch_size) == tuple(sizes[parameters].values())
        assert config.ppo.minibatch_size == PPOConfig().minibatch_size, "the optimizer's batch stays the same"
    assert [tuple(s.values()) for s in sizes.values()] == [(8, 16), (8, 16), (2, 6), (1, 3)]
    config = TrainerConfig()
    config.ppo.micro_batch_size = 4
    assert scale_batches_to_model(config, 7_000_000_000)["micro_batch_size"] == 4, "an explicit size is kept"


def test_a_preference_unrelated_to_length_moves_the_trait_not_the_length(demo_model_dir: Path) -> None:
    """Users prefer "friendly" replies over "formal" and "enthusiastic" ones, which are as long (about 50 words each
    in the corpus): the policy's friendly share on held-out prompts rises while its mean reply length stays within
    ±15% of the parent's. Replies are generated up to a cap well past their natural end, so length could move."""
    from alignd.demo.corpus import classify

    config = TrainerConfig(ppo=PPOConfig(iterations=6, rollout_batch_size=32, max_new_tokens=128, epochs=2,
                                         minibatch_size=8, rollout_backend="hf"),
                           gate=GateConfig(kl_budget=100.0), device="cpu", dtype="float32")
    stack = load_stack(demo_model_dir, config)
    grouped: dict[str, dict[str, str]] = {}
    for dialogue in generate_corpus(1200, seed=5):
        grouped.setdefault(dialogue.prompt, {})[dialogue.style] = dialogue.reply
    pairs = [[PreferencePair(prompt=user(p), chosen=r["friendly"], rejected=r[other])]
             for p, r in grouped.items() if "friendly" in r for other in ("formal", "enthusiastic") if other in r]
    figures = train_reward_model(stack, pairs, RewardConfig(epochs=2), config.lora)
    assert figures.heldout_accuracy is not None and figures.heldout_accuracy >= 0.8, figures
    torch.manual_seed(1)
    reference = HFRollouts().generate(stack, prompt_ids(stack, [p.text for p in training_prompts(64, seed=1)]),
                                      None, Sampling(1.0, 128))
    normalization = fit_normalization(stack, reference)
    heldout = prompt_ids(stack, [p.text for p in held_out_prompts(96, seed=3)])

    def measure(adapter: str | None) -> tuple[float, float]:
        torch.manual_seed(7)
        replies = HFRollouts().generate(stack, heldout, adapter, Sampling(1.0, 128))
        texts = [stack.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in replies]
        share = sum(classify(t).style == "friendly" for t in texts) / len(texts)
        return share, sum(len(r.response_ids) for r in replies) / len(replies)

    base_share, base_length = measure(None)
    run_ppo(stack, HFRollouts(), prompt_ids(stack, [p.text for p in training_prompts(200, seed=1)]), normalization,
            config)
    share, length = measure(POLICY)
    print(f"friendly share {base_share:.2f} -> {share:.2f}, mean length {base_length:.1f} -> {length:.1f} tokens")
    assert share >= base_share + 0.15
    assert 0.85 * base_length <= length <= 1.15 * base_length
