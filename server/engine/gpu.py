"""What the engine and the trainer ask of the machine: is there CUDA, and keeping an unusable triton out.

torch's wheels install triton, which only has GPU backends. Without a GPU, vLLM's CPU build (and torch's dynamo,
which transformers imports) still import it, only to find no usable driver and disable it; the import loads triton's
nanobind extension, which then prints hundreds of lines of "nanobind: leaked ..." warnings when the process exits.
:func:`hide_triton_without_gpu` makes triton look absent (``sys.modules["triton"] = None``: ``find_spec`` answers
None and ``import triton`` raises ImportError, both of which vLLM and torch treat as "not installed"), so it is never
loaded. Call it before vLLM or the training code is imported.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["has_cuda", "hide_triton_without_gpu"]


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def hide_triton_without_gpu() -> bool:
    """Hide triton when there is no CUDA and it has no CPU backend (triton-cpu); True when it was hidden."""
    if "triton" in sys.modules:  # already imported (or already hidden): too late, or nothing to do
        return sys.modules["triton"] is None
    spec = importlib.util.find_spec("triton")
    if spec is None or has_cuda():
        return False
    if any((Path(location) / "backends" / "cpu").is_dir() for location in spec.submodule_search_locations or ()):
        return False  # triton-cpu: vLLM's CPU build uses it
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True
