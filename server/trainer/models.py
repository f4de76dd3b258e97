"""One frozen base model serving every trainer role through named LoRA adapters and small scalar heads.

- ``policy``: the adapter that is trained by PPO and served;
- the reference: the base with adapters disabled (``with stack.use(None):``);
- ``reward``: an adapter plus a scalar head on the last hidden state;
- the critic: a value head on the reward adapter's hidden states (:mod:`alignd.trainer.critic`), no adapter.

One copy of the base weights serves all of them. On disk an adapter is a PEFT adapter folder (safetensors only,
never pickle) with its head, if it has one, in ``head.safetensors`` next to it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from alignd.trainer.config import AdapterConfig, AttentionName, DeviceName, DTypeName, TrainerConfig

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "HEAD_WEIGHTS",
    "POLICY",
    "REWARD",
    "ModelStack",
    "ScalarHead",
    "cpu_has_fast_bfloat16",
    "load_stack",
    "resolve_attention",
    "resolve_autocast",
    "resolve_device",
    "resolve_dtype",
]

POLICY, REWARD = "policy", "reward"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HEAD_WEIGHTS = "head.safetensors"


def resolve_device(name: DeviceName) -> torch.device:
    """The torch device for a configured name (``auto``: CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: DTypeName, device: torch.device) -> torch.dtype:
    """The base-model weights' dtype (``auto``: bfloat16 on a CUDA device that supports it, float32 otherwise)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def resolve_attention(name: AttentionName, device: torch.device) -> str:
    """The attention kernel for a configured name (``auto``: eager on the CPU, where it is faster for the lengths
    the trainer sees, PyTorch's fused kernel elsewhere)."""
    if name == "auto":
        return "eager" if device.type == "cpu" else "sdpa"
    return name


def resolve_autocast(name: DTypeName, device: torch.device) -> bool:
    """Whether forward passes compute in bfloat16 over float32 weights (``auto`` on a CPU with bfloat16
    instructions). On such a CPU (AVX512-BF16, AMX) it is about 3x faster forward and 2.7x forward+backward on
    SmolLM2-135M than float32, and keeps the weights and the optimizer in float32; bfloat16 *weights* on the CPU
    backpropagate more slowly than float32, so ``auto`` does not pick them there."""
    return name == "auto" and device.type == "cpu" and cpu_has_fast_bfloat16()


def cpu_has_fast_bfloat16() -> bool:
    """oneDNN can run bfloat16 here and the CPU has native bfloat16 instructions (not emulated)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust oneDNN
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def position_ids(attention_mask: Tensor) -> Tensor:  # (B, L)
    """Positions counted from each row's first real token, as vLLM and ``generate`` number left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)


class ScalarHead(nn.Module):
    """A linear map from the last hidden state to one number per position (reward or value)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # Small random init (not zero) so the adapter under the head gets gradients from the first step.
        nn.init.normal_(self.linear.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:  # hidden: (B, L, H)
        return self.linear(hidden.float()).squeeze(-1)  # (B, L); float32 even on a bf16 base


class ModelStack:
    """A frozen causal LM wrapped by PEFT with named LoRA adapters, scalar heads and a tokenizer."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, base_dir: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_dir = base_dir
        self.heads = nn.ModuleDict()
        self.device = next(model.parameters()).device
        self.autocast = False
        """Forward passes in bfloat16 autocast (see :func:`resolve_autocast`)."""

    @classmethod
    def load(
        cls, base_dir: str | Path, adapter: AdapterConfig, device: torch.device, dtype: torch.dtype,
        attention: str = "sdpa",
    ) -> ModelStack:
        """Load the base model frozen on ``device`` in ``dtype`` with the ``attention`` kernel, and a fresh
        ``policy`` adapter (a no-op at init)."""
        with _quiet_progress_bars():
            causal_lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation=attention)
            causal_lm.to(device)
        causal_lm.requires_grad_(False)
        causal_lm.eval()  # no dropout anywhere: rollout and update log-probs must agree
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = get_peft_model(causal_lm, _peft_config(adapter), adapter_name=POLICY)
        model.eval()
        return cls(model, tokenizer, str(base_dir))

    # --- adapters ----------------------------------------------------------------------------------------------

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The base causal LM (its linear layers carry the LoRA adapters)."""
        return self.model.get_base_model()

    @property
    def base_parameters(self) -> int:
        """Parameters of the frozen base model (adapters and heads not counted)."""
        return sum(p.numel() for n, p in self.causal_lm.named_parameters() if "lora_" not in n)

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    def add_adapter(self, name: str, adapter: AdapterConfig, head: bool = False) -> None:
        """Add a fresh adapter (a no-op until trained) and, with ``head``, a freshly initialised scalar head."""
        self._drop(name)
        self.model.add_adapter(name, _peft_config(adapter))
        if head:
            self.heads[name] = ScalarHead(self.hidden_size).to(self.device)

    def _drop(self, name: str) -> None:
        """Delete adapter ``name`` and its head if present (switching away first, so PEFT does not warn)."""
        if name not in self.model.peft_config:
            return
        if self.model.active_adapter == name:
            self.model.set_adapter(next(a for a in self.model.peft_config if a != name))
        self.model.delete_adapter(name)
        if name in self.heads:
            del self.heads[name]

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """A copy of adapter ``name``'s LoRA weights (to go back to them later: :meth:`load_adapter_state`)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if f".{name}." in n and "lora_" in n}

    def load_adapter_state(self, name: str, state: dict[str, Tensor]) -> None:
        """Put back LoRA weights taken by :meth:`adapter_state`."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)

    def role_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of one role: its LoRA weights and its head."""
        lora = [p for n, p in self.model.named_parameters() if f".{name}." in n and "lora_" in n]
        head = list(self.heads[name].parameters()) if name in self.heads else []
        return lora + head

    def compute(self) -> contextlib.AbstractContextManager[None]:
        """The precision of forward passes: bfloat16 autocast when :attr:`autocast`, else as the weights are."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Route forward passes through adapter ``name``, or through the bare base (the reference) with None.

        PEFT makes only the active adapter trainable, so run each backward pass inside the ``use`` of its forward.
        """
        if name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    # --- forward passes ----------------------------------------------------------------------------------------

    def response_logits(
        self,
        sequences: Tensor,  # (B, L) prompt (left-padded) then response (right-padded)
        attention_mask: Tensor,  # (B, L)
        response_len: int,
    ) -> Tensor:
        """Next-token logits at the positions that predict the last ``response_len`` tokens, (B, R, V), in the
        compute dtype; :mod:`alignd.trainer.logprobs` applies the temperature."""
        with self.compute():
            out = self.causal_lm(
                input_ids=sequences,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                logits_to_keep=response_len + 1,  # the position before the response predicts its first token
                use_cache=False,
            )
        return out.logits[:, :-1]  # (B, R, V)

    def hidden_states(self, sequences: Tensor, attention_mask: Tensor) -> Tensor:
        """The decoder's last hidden state (after its final norm) at every position, (B, L, H), through the active
        adapter; the LM head is not run."""
        backbone = getattr(self.causal_lm, self.causal_lm.base_model_prefix)  # the decoder without the LM head
        with self.compute():
            return backbone(
                input_ids=sequences,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
            ).last_hidden_state  # (B, L, H)

    def head_outputs(self, name: str, sequences: Tensor, attention_mask: Tensor) -> Tensor:
        """The scalar head ``name`` at every position, (B, L) float32; run it inside ``use(name)``."""
        return self.heads[name](self.hidden_states(sequences, attention_mask))  # (B, L)

    # --- disk --------------------------------------------------------------------------------------------------

    def save_adapter(self, name: str, folder: str | Path) -> Path:
        """Write adapter ``name`` as a PEFT adapter folder (safetensors), its head beside it; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.model, adapter_name=name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))
        config = copy.deepcopy(self.model.peft_config[name])
        config.inference_mode = True
        config.base_model_name_or_path = self.base_dir
        config.save_pretrained(str(folder))
        if name in self.heads:
            head = {k: v.detach().cpu().contiguous() for k, v in self.heads[name].state_dict().items()}
            save_file(head, str(folder / HEAD_WEIGHTS))
        return folder

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load a PEFT adapter folder (and its head, if saved) as adapter ``name``, replacing any of that name."""
        folder = Path(folder)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file() or not (folder / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{folder} is not a safetensors PEFT adapter folder (need {ADAPTER_WEIGHTS})")
        config = PeftLoraConfig(**_lora_fields(json.loads((folder / ADAPTER_CONFIG).read_text())))
        self._drop(name)
        self.model.add_adapter(name, config)
        state = load_file(str(weights), device=str(self.device))
        result = set_peft_model_state_dict(self.model, state, adapter_name=name)
        if result.unexpected_keys:
            raise ValueError(f"{folder}: weights that fit no layer of the base model: {result.unexpected_keys[:3]}")
        if (folder / HEAD_WEIGHTS).is_file():
            self.heads[name] = ScalarHead(self.hidden_size).to(self.device)
            self.heads[name].load_state_dict(load_file(str(folder / HEAD_WEIGHTS), device=str(self.device)))


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No weight-loading progress bar in the trainer's output (restored afterwards)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_stack(base_dir: str | Path, config: TrainerConfig, on_cpu: bool = False) -> ModelStack:
    """The stack for a run: the configured device and dtype (CUDA and bfloat16 when present), seeded adapters.
    ``on_cpu``: load the weights on the CPU whatever the device (a base to be sharded over the ranks,
    :func:`alignd.trainer.distributed.shard_base`, which moves each rank's shards to the device)."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)  # the fresh policy adapter's initialisation
    stack = ModelStack.load(base_dir, config.lora, torch.device("cpu") if on_cpu else device,
                            resolve_dtype(config.dtype, device), resolve_attention(config.attention, device))
    stack.autocast = resolve_autocast(config.dtype, device)
    if config.gradient_checkpointing:
        stack.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return stack


def _peft_config(adapter: AdapterConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _lora_fields(saved: dict[str, object]) -> dict[str, object]:
    """The fields of a saved adapter config that shape the adapter (others, like paths, are ignored)."""
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "fan_in_fan_out")
    return {"task_type": "CAUSAL_LM", **{k: saved[k] for k in keys if k in saved}}
