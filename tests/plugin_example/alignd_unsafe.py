"""alignd plugin: the feedback kind ``unsafe``. A user reports one choice as unsafe (with a category); the report is
an unpaired "bad" label for that reply, weighted by how serious the category is."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from alignd import CompletionRecord, Feedback, Label, RegisterKind, Signal, choice_text, completion_prompt, hookimpl

#: How much a report weighs in training, by category.
WEIGHTS = {"harmful": 2.0, "illegal": 2.0, "privacy": 1.5, "other": 1.0}


class UnsafeReport(msgspec.Struct, kw_only=True):
    """The body fields of an ``unsafe`` report (beside completion_id, kind, comment, ...)."""

    choice: Annotated[int, msgspec.Meta(ge=0)] = 0
    category: Literal["harmful", "illegal", "privacy", "other"] = "other"


def unsafe_signal(feedback: Feedback, completion: CompletionRecord) -> Signal:
    report: UnsafeReport = feedback.payload
    reply = choice_text(completion, report.choice)  # 422 naming "choice" if out of range
    return Signal(labels=[Label(prompt=completion_prompt(completion), reply=reply, good=False,
                                weight=WEIGHTS[report.category], choice=report.choice)])


@hookimpl
def register_feedback_kinds(register: RegisterKind) -> None:
    register("unsafe", UnsafeReport, unsafe_signal, description="Report a reply as unsafe: a weighted bad label.")
