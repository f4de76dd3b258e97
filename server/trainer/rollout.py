"""Rollouts: replies sampled from a policy, either by the serving vLLM engine or by ``generate`` in the trainer.

Generation is most of RLHF's time, so PPO samples from the serving engine: the policy adapter is saved to a
temporary PEFT folder and loaded under :data:`ROLLOUT_VERSION` (the engine gives every load a fresh LoRA id, so no
stale prefix-cache blocks survive between iterations). Whatever generated them, log-probs are recomputed in the
trainer at the sampling temperature, since vLLM's numerics (and its dtype) differ from the trainer's.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase

from alignd.engine.rollouts import adapter_replies
from alignd.policies.router import RESERVED_VERSIONS
from alignd.protocol import SamplingOptions
from alignd.trainer.config import RolloutBackendName
from alignd.trainer.logprobs import token_logprobs
from alignd.trainer.models import ModelStack

__all__ = [
    "ROLLOUT_VERSION",
    "Experience",
    "HFRollouts",
    "PolicyEngine",
    "RemoteRollouts",
    "Rollout",
    "RolloutBackend",
    "RolloutLink",
    "Sampling",
    "VLLMRollouts",
    "collate_rollouts",
    "encode_prompt",
    "make_rollout_backend",
    "policy_logprobs",
]

T = TypeVar("T")

ROLLOUT_VERSION = RESERVED_VERSIONS
"""Engine policy version the candidate is loaded under while generating rollouts; far above any real version
(the router must not serve it to users)."""


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled: plain temperature sampling (no top-k / top-p), so log-probs can be recomputed."""

    temperature: float
    max_new_tokens: int


@dataclass(frozen=True)
class Rollout:
    """One sampled reply as token ids."""

    prompt_ids: list[int]
    """The rendered prompt (chat template, generation prompt opened)."""
    response_ids: list[int]
    """The reply, ending with EOS when ``ended``."""
    ended: bool
    """Whether the reply finished with EOS before the length limit."""


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], max_tokens: int) -> list[int]:
    """Token ids of a conversation with the assistant turn opened, exactly as the engine renders it; keeps the tail."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer.encode(text, add_special_tokens=False))  # the template writes the special tokens
    return ids[-max_tokens:]


class RolloutBackend(Protocol):
    """Samples one reply per prompt from adapter ``adapter`` of the stack (None: the bare base model); with
    ``seeds`` (one per prompt), two policies given the same seeds draw with the same random numbers, so that their
    replies to one prompt differ only where the policies do (the gate's paired comparison)."""

    def generate(
        self, stack: ModelStack, prompts: Sequence[list[int]], adapter: str | None, sampling: Sampling,
        seeds: Sequence[int] | None = None,
    ) -> list[Rollout]: ...


# --- trainer-side generation ----------------------------------------------------------------------------------


class HFRollouts:
    """Hugging Face ``generate`` in the trainer: the slow baseline the benchmark compares vLLM against."""

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(
        self, stack: ModelStack, prompts: Sequence[list[int]], adapter: str | None, sampling: Sampling,
        seeds: Sequence[int] | None = None,
    ) -> list[Rollout]:
        tokenizer = stack.tokenizer
        if seeds:  # one generator for the batch: the same draws for the same batch, not per prompt as in vLLM
            torch.manual_seed(seeds[0])
        config = GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_k=0,  # pure temperature sampling: the distribution the trainer recomputes
            top_p=1.0,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        rollouts: list[Rollout] = []
        with stack.use(adapter), stack.compute():
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                input_ids, attention_mask = _left_pad(chunk, tokenizer.pad_token_id, stack.device)
                output = stack.causal_lm.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )  # (b, P + new)
                for prompt, row in zip(chunk, output[:, input_ids.shape[1] :].tolist(), strict=True):
                    rollouts.append(_cut_at_eos(prompt, row, tokenizer.eos_token_id))
        return rollouts


def _left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (b, P)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (b, P)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_eos(prompt: list[int], generated: list[int], eos_id: int) -> Rollout:
    """``generate`` pads finished rows; keep each reply up to and including its first EOS."""
    if eos_id in generated:
        end = generated.index(eos_id) + 1
        return Rollout(prompt_ids=list(prompt), response_ids=generated[:end], ended=True)
    return Rollout(prompt_ids=list(prompt), response_ids=generated, ended=False)


# --- engine-side generation -----------------------------------------------------------------------------------


class PolicyEngine(Protocol):
    """The part of the serving engine's API rollouts need (see ``alignd.engine.vllm_engine.VLLMEngine``)."""

    async def load_policy(self, version: int, adapter_dir: str | Path) -> None: ...

    async def unload_policy(self, version: int) -> None: ...

    def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        policy_version: int = 0,
        *,
        stream: bool = False,
    ) -> AsyncIterator[Any]: ...


class VLLMRollouts:
    """Rollouts generated by the serving engine with the trainer's current adapter.

    The engine's methods are coroutines on the engine's own event loop: pass ``loop`` when the engine lives on a
    loop in another thread (the trainer then blocks on each call); without it, each call runs in ``asyncio.run``.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        loop: asyncio.AbstractEventLoop | None = None,
        workdir: str | Path | None = None,
        request_prefix: str = "rollout",
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.workdir = workdir
        self.request_prefix = request_prefix

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop is None:
            return asyncio.run(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def generate(
        self, stack: ModelStack, prompts: Sequence[list[int]], adapter: str | None, sampling: Sampling,
        seeds: Sequence[int] | None = None,
    ) -> list[Rollout]:
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix="alignd-rollout-") as tmp:
            folder = None if adapter is None else stack.save_adapter(adapter, Path(tmp) / adapter)
            replies = self._run(adapter_replies(
                self.engine, prompts, folder, ROLLOUT_VERSION, temperature=sampling.temperature,
                max_new_tokens=sampling.max_new_tokens, request_prefix=self.request_prefix, seeds=seeds))
        return [Rollout(prompt_ids=list(p), response_ids=r, ended=e)
                for p, (r, e) in zip(prompts, replies, strict=True)]



class RolloutLink(Protocol):
    """How a trainer process asks the server for something (see :mod:`alignd.trainer.child`)."""

    def call(self, method: str, payload: dict[str, Any]) -> Any: ...


class RemoteRollouts:
    """Rollouts from the serving engine of the server that started this trainer process: the adapter is saved
    into the run's folder and the server loads it under a reserved version, generates and unloads it."""

    def __init__(self, link: RolloutLink, workdir: str | Path) -> None:
        self.link = link
        self.workdir = Path(workdir)

    def generate(
        self, stack: ModelStack, prompts: Sequence[list[int]], adapter: str | None, sampling: Sampling,
        seeds: Sequence[int] | None = None,
    ) -> list[Rollout]:
        payload: dict[str, Any] = {"prompts": [list(p) for p in prompts], "temperature": sampling.temperature,
                                   "max_new_tokens": sampling.max_new_tokens,
                                   "adapter_dir": None, "seeds": list(seeds) if seeds is not None else None}
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix="rollout-") as tmp:
            if adapter is not None:
                payload["adapter_dir"] = str(stack.save_adapter(adapter, Path(tmp) / adapter))
            replies = self.link.call("rollouts", payload)
        return [Rollout(prompt_ids=list(p), response_ids=list(r), ended=bool(e))
                for p, (r, e) in zip(prompts, replies, strict=True)]


def make_rollout_backend(
    name: RolloutBackendName,
    engine: PolicyEngine | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    workdir: str | Path | None = None,
) -> RolloutBackend:
    """The configured backend: ``vllm`` needs the serving engine (and its loop), ``hf`` needs nothing."""
    if name == "hf":
        return HFRollouts()
    if engine is None:
        raise ValueError("the vllm rollout backend needs the serving engine")
    return VLLMRollouts(engine, loop=loop, workdir=workdir)


# --- tensors --------------------------------------------------------------------------------------------------


def collate_rollouts(rollouts: Sequence[Rollout], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(sequences, attention_mask, action_mask)``: prompts left-padded to P, replies right-padded to R.

    sequences: (B, P + R); attention_mask: (B, P + R); action_mask: (B, R), 1 on reply tokens.
    """
    prompt_width = max(len(r.prompt_ids) for r in rollouts)
    response_width = max(1, max(len(r.response_ids) for r in rollouts))
    batch = len(rollouts)
    sequences = torch.full((batch, prompt_width + response_width), pad_id, dtype=torch.long)  # (B, P + R)
    attention_mask = torch.zeros_like(sequences)  # (B, P + R)
    for row, rollout in enumerate(rollouts):
        prompt, response = rollout.prompt_ids, rollout.response_ids
        sequences[row, prompt_width - len(prompt) : prompt_width] = torch.tensor(prompt)
        sequences[row, prompt_width : prompt_width + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[row, prompt_width - len(prompt) : prompt_width + len(response)] = 1
    action_mask = attention_mask[:, prompt_width:].clone()  # (B, R)
    return sequences.to(device), attention_mask.to(device), action_mask.to(device)


def policy_logprobs(
    stack: ModelStack,
    sequences: Tensor,  # (B, P + R)
    attention_mask: Tensor,  # (B, P + R)
    response_len: int,
    temperature: float,
) -> Tensor:
    """Log-probs of the reply tokens under the active adapter, (B, R), from logits / T: the distribution the
    reply was sampled from."""
    logits = stack.response_logits(sequences, attention_mask, response_len)  # (B, R, V)
    return token_logprobs(logits, sequences[:, -response_len:], temperature)


@dataclass
class Experience:
    """One iteration's rollouts with everything PPO needs; B sequences, P prompt and R reply positions."""

    sequences: Tensor  # (B, P + R) prompt left-padded, reply right-padded
    attention_mask: Tensor  # (B, P + R)
    action_mask: Tensor  # (B, R) 1 on reply tokens (EOS included)
    logprobs: Tensor  # (B, R) log π_old(a_t) at the sampling temperature
    ref_logprobs: Tensor  # (B, R) log π_ref(a_t), base with adapters disabled
    values: Tensor  # (B, R) critic V(s_t) at rollout time
    features: Tensor  # (B, R, H) reward adapter's hidden states where each reply token is predicted (critic input)
    rewards: Tensor  # (B, R) -β·KL per token, plus the score at the last token
    advantages: Tensor  # (B, R) GAE, whitened over the batch
    returns: Tensor  # (B, R) advantages (unwhitened) + values
    scores: Tensor  # (B,) normalised reward-model score, minus the no-EOS penalty
    ended: Tensor  # (B,) bool, reply ended with EOS
    kl: Tensor  # (B, R) log π_old - log π_ref per token (0 on padding)
    full_kl: Tensor  # (B, R) KL(π_old || π_ref) over the vocabulary at each reply position (0 on padding)
    entropy: Tensor  # (B, R) policy entropy at each reply position

    @property
    def response_len(self) -> int:
        return self.action_mask.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: Tensor) -> Experience:  # index: (b,)
        """The rows ``index`` of every tensor (a minibatch)."""
        return Experience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})
