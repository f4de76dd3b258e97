"""What feedback plugins work with: the event, the training signal it yields, a rejection, the per-app context, and
the ``register`` callbacks of the contribution hooks. Light (msgspec and the store's records only), so the hook specs
and the public ``alignd`` module import it without pulling in the manager, the HTTP layer or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import msgspec

from alignd.errors import InvalidFeedback
from alignd.messages import plain_messages
from alignd.principals import Principal
from alignd.protocol import FeedbackEvent
from alignd.store.records import CompletionRecord, Label, PreferencePair

if TYPE_CHECKING:
    from alignd.config import Settings
    from alignd.metrics import Metrics

__all__ = [
    "CallerFeedback",
    "Converter",
    "Feedback",
    "FeedbackKind",
    "FeedbackSubmitter",
    "InvalidFeedback",
    "Label",
    "PluginContext",
    "PreferencePair",
    "RegisterKind",
    "RegisterRoute",
    "Rejection",
    "Signal",
    "choice_text",
    "completion_prompt",
    "feedback_event",
    "iso",
    "payload_choice",
]


# --- what plugins see --------------------------------------------------------------------------------------------


class Feedback(msgspec.Struct, kw_only=True):
    """One feedback event as plugins see it. ``payload`` is an instance of the kind's payload Struct."""

    id: str
    """``"fb-…"``, assigned before any hook runs."""
    completion_id: str
    kind: str
    payload: Any
    user: str | None
    """The body's ``user``, else the completion's ``user``; for a ``user`` key always its principal's name."""
    comment: str | None
    tags: list[str]
    idempotency_key: str | None
    created: datetime
    history: list[Feedback] = []
    """Earlier accepted feedback of this kind on the same completion, oldest first; filled only for kinds
    registered with ``uses_history=True`` (their own ``history`` is empty)."""
    principal: str | None = None
    """The principal whose API key sent it (None: sent without a key, or stored by a plugin route that checks its
    callers itself)."""


class Signal(msgspec.Struct, kw_only=True):
    """What a feedback event yields for training: preference pairs and/or unpaired labels (maybe neither)."""

    pairs: list[PreferencePair] = []
    labels: list[Label] = []


class Rejection(msgspec.Struct, kw_only=True):
    """A ``filter_feedback`` verdict: refuse this event with ``status`` (422, or 429 for quotas)."""

    reason: str
    """Shown to the client as the error message."""
    code: str = "feedback_rejected"
    """Short machine-readable reason: the error's ``code`` and the metric's ``reason`` label."""
    status: Literal[422, 429] = 422
    param: str | None = None
    """The offending request field, if one is to blame (a 422's ``param``)."""
    retry_after: float | None = None
    """Seconds until a retry may succeed (sent as ``Retry-After`` with a 429)."""


Converter = Callable[[Feedback, CompletionRecord], Signal]


@dataclass(frozen=True, slots=True)
class FeedbackKind:
    """A registered feedback kind."""

    name: str
    payload: type[msgspec.Struct]
    convert: Converter
    plugin: str
    description: str = ""
    uses_history: bool = False

    @property
    def fields(self) -> frozenset[str]:
        """The body fields of this kind (the payload Struct's field names)."""
        return frozenset(self.payload.__struct_fields__)


class RegisterKind(Protocol):
    def __call__(self, name: str, payload: type[msgspec.Struct], convert: Converter, *, description: str = "",
                 uses_history: bool = False) -> None: ...


@runtime_checkable  # Litestar checks an injected value against its parameter's type
class FeedbackSubmitter(Protocol):
    """What a plugin's route handler receives as its ``feedback`` parameter: stores a feedback body exactly like
    ``POST /v1/feedback`` (same validation, hooks and errors), for the route's caller (:class:`CallerFeedback`), and
    returns ``(created, replayed)``."""

    async def submit(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> Any: ...


@dataclass(frozen=True, slots=True)
class CallerFeedback:
    """The feedback service acting for one caller: what a plugin route receives as its ``feedback`` parameter, so
    that feedback it stores follows the caller's ownership rules like ``POST /v1/feedback`` (no principal: a route
    with ``auth="none"``, which checks its callers itself)."""

    service: Any
    """The :class:`~alignd.feedback.service.FeedbackService`."""
    principal: Principal | None

    async def submit(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> Any:
        return await self.service.submit(body, idempotency_key=idempotency_key, principal=self.principal)


class RegisterRoute(Protocol):
    def __call__(self, handler: Any, *, auth: Literal["user", "admin", "none"] = "user") -> None: ...


@dataclass
class PluginContext:
    """Per-app things plugins may use; keep your own per-app objects in ``state[<your plugin name>]``."""

    settings: Settings
    metrics: Metrics
    state: dict[str, Any] = field(default_factory=dict)
    store: Any = None
    """The app's :class:`alignd.store.Store` (``store.embedded`` False: replicas share it), for state every replica
    must agree on, as the quota's counters; call it on the event loop (from a hook's thread:
    ``asyncio.run_coroutine_threadsafe`` with the loop ``startup`` ran on)."""


def completion_prompt(completion: CompletionRecord) -> list[dict[str, Any]]:
    """The completion's request messages as plain ``{"role", "content"}`` dicts (content parts joined, the
    ``developer`` role as ``system``; see :func:`alignd.messages.plain_messages`): the ``prompt`` of TRL's
    conversational formats and of the trainer."""
    return plain_messages(completion.messages)


def choice_text(completion: CompletionRecord, index: int, *, param: str = "choice") -> str:
    """The text of choice ``index``; an index the completion lacks is an ``InvalidFeedback`` naming ``param``."""
    if not 0 <= index < len(completion.choices):
        raise InvalidFeedback(
            f"{param} is {index}, but completion {completion.id} has {len(completion.choices)} choice(s) "
            f"(0…{len(completion.choices) - 1}).", param=param)
    return completion.choices[index].text


def iso(moment: datetime) -> str:
    """A UTC timestamp as ISO 8601 with a ``Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def feedback_event(feedback: Feedback, completion: CompletionRecord, signal: Signal) -> FeedbackEvent:
    """The event line of a just-stored feedback event (what ``jsonl_sink`` writes and ``webhook`` posts)."""
    return FeedbackEvent(
        id=feedback.id, created=iso(feedback.created), completion_id=completion.id, kind=feedback.kind,
        choice=payload_choice(feedback.payload), policy_version=completion.policy_version,
        payload=msgspec.to_builtins(feedback.payload), user=feedback.user, comment=feedback.comment,
        tags=feedback.tags, pairs=len(signal.pairs), labels=len(signal.labels),
        prompt=completion_prompt(completion), choices=[c.text for c in completion.choices],
        principal=feedback.principal)


def payload_choice(payload: Any) -> int | None:
    choice = getattr(payload, "choice", None)
    return choice if isinstance(choice, int) else None
