"""What the store keeps, as msgspec Structs (plain data, no database handles)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "ChoiceRecord",
    "CompletionRecord",
    "FeedbackRecord",
    "Label",
    "PreferencePair",
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
    principal: str | None = None
    """The principal whose key made it (None: made without a key)."""


class PreferencePair(msgspec.Struct, kw_only=True):
    """Training signal: for ``prompt``, reply ``chosen`` is better than ``rejected``.

    The one pair type: a feedback plugin's converter returns it, the store keeps it (read back as
    :class:`StoredPair`, with provenance), the export and the trainer read it."""

    prompt: list[dict[str, Any]]
    """The conversation before the reply: ``[{"role", "content"}, …]`` (see ``alignd.completion_prompt``)."""
    chosen: str
    rejected: str
    margin: float = 0.0
    """How much better (reward units, ≥ 0): subtracted inside the Bradley–Terry loss."""
    weight: float = 1.0
    """Loss weight (a ranking of K choices weighs each of its pairs 1/C(K,2))."""
    chosen_choice: int | None = None
    """Index of the chosen reply among the completion's choices (None: not a generated choice, e.g. an edit)."""
    rejected_choice: int | None = None


class Label(msgspec.Struct, kw_only=True):
    """Training signal without a pair: ``reply`` to ``prompt`` is good or bad (KTO, the reward model's binary term).

    The one label type, from plugin to store (read back as :class:`StoredLabel`) to trainer."""

    prompt: list[dict[str, Any]]
    reply: str
    good: bool
    weight: float = 1.0
    choice: int | None = None
    """Index of the judged reply among the completion's choices, when it is one."""


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
    pairs: list[PreferencePair] = []
    labels: list[Label] = []
    principal: str | None = None
    """The principal whose key sent it (None: sent without a key, or by trusted server-side code)."""


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
    principal: str | None = None


class StoredPair(PreferencePair, kw_only=True):
    """A stored preference pair with its provenance."""

    id: int
    feedback_id: str
    completion_id: str
    kind: str
    policy_version: int
    created: datetime
    used_in_run: str | None = None


class StoredLabel(Label, kw_only=True):
    """A stored unpaired label with its provenance."""

    id: int
    feedback_id: str
    completion_id: str
    kind: str
    policy_version: int
    created: datetime
    used_in_run: str | None = None
