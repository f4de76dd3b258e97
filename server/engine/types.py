"""Engine-neutral types shared by the engine wrapper and the services (no vLLM import here)."""

from __future__ import annotations

import msgspec


class ChoiceDelta(msgspec.Struct, kw_only=True):
    """New output of one choice since the previous step (the whole output when not streaming)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class GenerationStep(msgspec.Struct, kw_only=True):
    """What one engine step produced for a request: deltas of the choices that advanced."""

    choices: list[ChoiceDelta]
    finished: bool
