"""Feedback kind ``edit``: the user's corrected reply is preferred over the choice it corrects."""

from __future__ import annotations

from alignd import (
    CompletionRecord,
    Feedback,
    InvalidFeedback,
    PreferencePair,
    RegisterKind,
    Signal,
    choice_text,
    completion_prompt,
    hookimpl,
)
from alignd.protocol import EditFeedback


@hookimpl
def register_feedback_kinds(register: RegisterKind) -> None:
    register("edit", EditFeedback, edit_signal, description="A corrected reply: a pair, the edit over the original.")


def edit_signal(feedback: Feedback, completion: CompletionRecord) -> Signal:
    payload: EditFeedback = feedback.payload
    original = choice_text(completion, payload.choice)
    if not payload.text.strip():
        raise InvalidFeedback("text is empty; send the corrected reply.", param="text")
    if payload.text.strip() == original.strip():
        raise InvalidFeedback("text is the same as the original reply; send the corrected reply.", param="text")
    return Signal(pairs=[PreferencePair(prompt=completion_prompt(completion), chosen=payload.text, rejected=original,
                                        rejected_choice=payload.choice)])
