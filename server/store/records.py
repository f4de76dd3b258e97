"""What the store keeps, as msgspec Structs (plain data, no database handles)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "ChoiceRecord",
    "CompletionRecord",
    "FeedbackRecord",
    "LabelRecord",
    "PairRecord",
    "StoredFeedback",
    "StoredLabel",
    "StoredPair",
]


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


class PairRecord(msgspec.Struct, kw_only=True):
    """A preference pair derived from a feedback event: for ``prompt``, ``chosen`` beats ``rejected``."""

    prompt: list[dict[str, Any]]
    """The conversation before the reply, as ``{"role", "content"}`` dicts."""
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0
    chosen_choice: int | None = None
    """Index of the chosen reply among the completion's choices (None: not a generated choice, e.g. an edit)."""
    rejected_choice: int | None = None


class LabelRecord(msgspec.Struct, kw_only=True):
    """An unpaired label derived from a feedback event: ``reply`` to ``prompt`` is good or bad."""

    prompt: list[dict[str, Any]]
    reply: str
    good: bool
    weight: float = 1.0
    choice: int | None = None


class FeedbackRecord(msgspec.Struct, kw_only=True):
    """A feedback event to store, with the pairs and labels derived from it (committed together)."""

    id: str
    """``"fb-…"``."""
    completion_id: str
    kind: str
    choice: int | None
    """The choice the event is about, for kinds about one choice (thumbs, rating, edit)."""
    payload: dict[str, Any]
    """The kind's own fields, as sent (after redaction)."""
    user: str | None
    comment: str | None
    tags: list[str]
    idempotency_key: str | None
    request_hash: str | None
    """Hash of the request body, to tell a retry from a different request under the same idempotency key."""
    policy_version: int
    """The policy version that generated the completion."""
    created: datetime
    pairs: list[PairRecord] = []
    labels: list[LabelRecord] = []


class StoredFeedback(msgspec.Struct, kw_only=True):
    """A feedback event as read back (without its pairs and labels, but with their counts)."""

    id: str
    completion_id: str
    kind: str
    choice: int | None
    payload: dict[str, Any]
    user: str | None
    comment: str | None
    tags: list[str]
    idempotency_key: str | None
    request_hash: str | None
    policy_version: int
    created: datetime
    pair_count: int
    label_count: int


class StoredPair(PairRecord, kw_only=True):
    """A stored preference pair with its provenance."""

    id: int
    feedback_id: str
    completion_id: str
    kind: str
    policy_version: int
    created: datetime
    used_in_run: str | None = None


class StoredLabel(LabelRecord, kw_only=True):
    """A stored unpaired label with its provenance."""

    id: int
    feedback_id: str
    completion_id: str
    kind: str
    policy_version: int
    created: datetime
    used_in_run: str | None = None
