"""What the store keeps, as msgspec Structs (plain data, no database handles)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

__all__ = ["ChoiceRecord", "CompletionRecord"]


class ChoiceRecord(msgspec.Struct, kw_only=True):
    """One generated choice of a completion."""

    index: int
    """Position among the completion's choices (0 … n-1)."""
    text: str
    """The generated assistant text."""
    token_ids: list[int]
    """The generated token ids, as the engine sampled them (needed to recompute log-probs)."""
    finish_reason: str | None
    """``"stop"``, ``"length"``, … or None when the generation did not finish (e.g. aborted)."""


class CompletionRecord(msgspec.Struct, kw_only=True):
    """A chat completion as stored: the request, who served it, and every choice."""

    id: str
    """The response id, ``"chatcmpl-…"``."""
    created: datetime
    """When the request was answered; must be timezone-aware (stored and returned as UTC)."""
    model: str
    """The model name as requested (``"alignd"``, ``"alignd@3"``, …)."""
    policy_version: int
    """The policy version that generated the choices."""
    messages: list[dict[str, Any]]
    """The request's messages, as sent."""
    params: dict[str, Any]
    """The sampling parameters used (temperature, top_p, max_tokens, n, seed, stop, …)."""
    user: str | None
    """The request's ``user`` field."""
    metadata: dict[str, Any] | None
    """The request's ``metadata`` field."""
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    """Wall time from request to last token, in milliseconds."""
    stream: bool
    """Whether the response was streamed."""
    choices: list[ChoiceRecord]
    """The generated choices, in index order."""
