"""A vLLM general plugin: base-model requests batched with LoRA requests on the CPU get no adapter applied.

vLLM's CPU LoRA path (``vllm.lora.ops.torch_ops``, used by ``PunicaWrapperCPU``) selects each token's adapter
weights with ``weights[token_lora_indices]``; a token of a request without LoRA has index -1, which in PyTorch picks
the *last* adapter slot. So whenever a batch mixes the two (a user on the base model while another is on a policy
adapter, a canary, a side-by-side, or the trainer's rollouts), base requests were answered with whatever adapter sat
in the last slot: measured on the demo model, the base's "enthusiastic" share went from 23% to 94% in batches shared
with an adapter that writes it 96% of the time. vLLM's GPU kernels skip index -1; this plugin makes the CPU ops do
the same: rows without LoRA get zero input, hence zero LoRA contribution (shrink writes 0, expand adds 0).

Registered as an entry point in ``vllm.general_plugins``, which vLLM loads in every process it starts (the engine
core and its workers), before any model runs. ``tests/test_canary.py`` and ``tests/test_chat_api.py`` check it
through real mixed batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
"""The per-token ops; the ``sgmv_*`` (prefill) ones expand their indices and call these through the module."""


def _masking(op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    def masked(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        no_lora = indices < 0  # (T,)
        if not bool(no_lora.any()) or inputs.shape[0] != indices.shape[0]:
            return op(inputs, weights, output, indices, *args, **kwargs)
        inputs = inputs.masked_fill(no_lora.unsqueeze(-1), 0)  # (T, H): no contribution from any slot
        return op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)

    masked.__alignd_masked__ = True  # type: ignore[attr-defined]
    return masked


def register() -> None:
    """Wrap the CPU LoRA ops where vLLM looks them up (idempotent)."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the CPU LoRA path: nothing to fix
        return
    for name in _OPS:
        original = getattr(lora_ops, name, None)
        if original is None or getattr(original, "__alignd_masked__", False):
            continue
        masked = _masking(original)
        # Where each is looked up: the ops module (the sgmv_* ops call it), the package that re-exports it, and the
        # CPU wrapper that imported it by name.
        for module in (lora_ops, torch_ops, punica_cpu):
            if getattr(module, name, None) is original:
                setattr(module, name, masked)
    log.debug("CPU LoRA ops patched: tokens without LoRA get no adapter")
