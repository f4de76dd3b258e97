"""Which model alignd serves and trains: the built-in demo model, a Hugging Face folder or id, or a ``.gguf`` file.

A ``.gguf`` file (what llama.cpp and Ollama users have) is converted once into an ordinary safetensors folder in the
data dir, named by the file's SHA-256, so that vLLM serves it and the trainer loads it like any folder: transformers'
GGUF loader dequantises the weights, which are copied into a plain model of the same architecture (no quantisation
config) and saved with the tokenizer and its chat template. A later start with the same file finds the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from alignd.config import ConfigError

__all__ = ["ModelError", "check_model", "convert_gguf", "resolve_model"]

log = logging.getLogger(__name__)

_DONE = "alignd-gguf.json"  # written last: a folder without it is an interrupted conversion
_HASH_CHUNK = 8 << 20


class ModelError(ConfigError):
    """The configured model cannot be served; the message names the file or folder and the reason."""


def resolve_model(model: str | None, data_path: Path, *, progress: bool = True) -> str:
    """What the engine and the trainer load for the configured ``model``: the demo model (built the first time) when
    none is set, the converted folder for a ``.gguf`` file, else the folder or hub id as given (checked first)."""
    if not model:
        from alignd.demo.build import ensure_demo_model

        return str(ensure_demo_model(data_path / "models", progress=progress))
    check_model(model)
    if model.endswith(".gguf"):
        return str(convert_gguf(Path(model), data_path / "models", progress=progress))
    local = Path(model).expanduser()
    return str(local) if local.is_dir() else model  # a folder as a path the loaders take; else a hub id


def check_model(model: str) -> None:
    """Refuse, before anything starts, a model that is named like a local path but cannot be served from it."""
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        _check_gguf(path)
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        return
    if path.exists():
        raise ModelError(f"model {path} is a file but not a .gguf file; give a model folder, a hub id or a .gguf file")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:  # a path, not a hub id ("name", "org/name")
        raise ModelError(f"model {model} does not exist")


def _check_gguf(path: Path) -> str:
    """The file's architecture; a missing, unreadable or non-GGUF file, or an architecture transformers cannot
    load, is a :class:`ModelError` naming the file."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"model file {path} cannot be read: {e.strerror or e}") from e
    if magic != b"GGUF":
        raise ModelError(f"model file {path} is not a GGUF file (it does not start with the GGUF magic number)")
    try:
        import gguf
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as e:  # pragma: no cover - both are alignd dependencies
        raise ModelError(f"reading {path} needs the gguf package: {e}") from e
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise ModelError(f"model file {path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(f"model file {path} holds a {architecture!r} model, which transformers cannot load from GGUF "
                         f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    return architecture


def file_digest(path: Path, *, progress: bool = True) -> str:
    """SHA-256 of a (large) file, with a progress bar."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress,
                                    desc=f"hashing {path.name}") as bar:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def convert_gguf(path: Path, models_dir: Path, *, progress: bool = True) -> Path:
    """The safetensors folder for a ``.gguf`` file, converted into ``models_dir`` the first time (cached by the
    file's hash, so a changed file is converted again). Raises :class:`ModelError` naming the file."""
    path = path.expanduser().resolve()
    architecture = _check_gguf(path)
    digest = file_digest(path, progress=progress)
    folder = models_dir / f"gguf-{path.stem}-{digest[:12]}"
    if (folder / _DONE).is_file():
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("converting %s (%s) into %s", path, architecture, folder)
    try:
        _convert(path, partial, progress=progress)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelError(f"model file {path} could not be converted: {type(e).__name__}: {e}") from e
    (partial / _DONE).write_text(json.dumps({"source": str(path), "sha256": digest, "architecture": architecture}))
    try:
        partial.rename(folder)
    except OSError:  # another process converted the same file meanwhile: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _convert(path: Path, out: Path, *, progress: bool) -> None:
    """Dequantise ``path`` with transformers' GGUF loader into a plain model of its architecture; save it as
    bf16 safetensors with its tokenizer (chat template included)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"converting {path.name}", disable=not progress)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    steps.update()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    steps.update()
    config: Any = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised now; vLLM must not expect GGUF
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()
