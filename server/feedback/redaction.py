"""Redaction of what leaves the server: the ``redact_text`` hook applied to every text of the exports, of
``GET /v1/feedback`` and of what ``on_feedback`` sinks receive.

What is stored stays as it was written (``prepare_feedback`` is where a plugin changes that): the trainer learns
from the conversations themselves, inside alignd. Everything sent out is a redacted copy; nothing is changed in
place, since the same objects also serve the feedback service's caches.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pluggy

from alignd.feedback.manager import call_impl, hook_impls
from alignd.feedback.types import Feedback, Signal
from alignd.protocol import FeedbackEvent
from alignd.store.records import CompletionRecord

__all__ = ["Redactor"]


class Redactor:
    """Applies every ``redact_text`` implementation in turn (looked up per call: plugins registered at run time
    count too). With none, every method returns its argument itself."""

    def __init__(self, hook: pluggy.HookCaller) -> None:
        self._hook = hook

    @property
    def active(self) -> bool:
        """Whether any plugin redacts."""
        return bool(self._hook.get_hookimpls())

    def text(self, text: str) -> str:
        for impl in hook_impls(self._hook):
            masked = call_impl(impl, text=text)
            if masked is not None:
                text = masked
        return text

    def value(self, value: Any) -> Any:
        """Every string inside ``value`` (nested lists and dicts; keys stay) redacted, in a copy."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        return value

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chat messages with their content redacted (a string, or the ``text`` of content parts)."""
        if not self.active:
            return messages
        return [{**message, "content": self.value(message["content"])} if "content" in message else message
                for message in messages]

    def completion(self, completion: CompletionRecord) -> CompletionRecord:
        """The request's messages and metadata and every choice's text redacted."""
        if not self.active:
            return completion
        return msgspec.structs.replace(
            completion, messages=self.messages(completion.messages), metadata=self.value(completion.metadata),
            choices=[msgspec.structs.replace(c, text=self.text(c.text)) for c in completion.choices])

    def feedback(self, feedback: Feedback) -> Feedback:
        """The comment, tags, the payload's text fields and the history's redacted."""
        if not self.active:
            return feedback
        payload = feedback.payload
        if isinstance(payload, msgspec.Struct):
            texts = {name: self.value(getattr(payload, name)) for name in payload.__struct_fields__
                     if isinstance(getattr(payload, name), (str, list, dict))}
            payload = msgspec.structs.replace(payload, **texts)
        return msgspec.structs.replace(
            feedback, comment=self.value(feedback.comment), tags=self.value(feedback.tags), payload=payload,
            history=[self.feedback(earlier) for earlier in feedback.history])

    def signal(self, signal: Signal) -> Signal:
        """Each pair's prompt and replies and each label's prompt and reply redacted."""
        if not self.active:
            return signal
        return Signal(
            pairs=[msgspec.structs.replace(p, prompt=self.messages(p.prompt), chosen=self.text(p.chosen),
                                           rejected=self.text(p.rejected)) for p in signal.pairs],
            labels=[msgspec.structs.replace(lb, prompt=self.messages(lb.prompt), reply=self.text(lb.reply))
                    for lb in signal.labels])

    def event(self, event: FeedbackEvent) -> FeedbackEvent:
        """An ``events`` line with its prompt, choices, comment, tags and payload redacted."""
        if not self.active:
            return event
        return msgspec.structs.replace(
            event, prompt=self.messages(event.prompt), choices=self.value(event.choices),
            comment=self.value(event.comment), tags=self.value(event.tags), payload=self.value(event.payload))

    def sink_arguments(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """An ``on_feedback`` call's arguments with what they carry redacted."""
        if not self.active:
            return kwargs
        out = dict(kwargs)
        if "feedback" in out:
            out["feedback"] = self.feedback(out["feedback"])
        if "completion" in out:
            out["completion"] = self.completion(out["completion"])
        if "signal" in out:
            out["signal"] = self.signal(out["signal"])
        return out
