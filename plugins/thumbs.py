"""Feedback kind ``thumbs``: up or down on one choice.

Each event is an unpaired label (up: good, down: bad). When the same completion also has the opposite verdict on
another choice (its latest one), the two make a preference pair: the up choice over the down choice.
"""

from __future__ import annotations

from alignd import (
    CompletionRecord,
    Feedback,
    Label,
    PreferencePair,
    RegisterKind,
    Signal,
    choice_text,
    completion_prompt,
    hookimpl,
)
from alignd.protocol import ThumbsFeedback


@hookimpl
def register_feedback_kinds(register: RegisterKind) -> None:
    register("thumbs", ThumbsFeedback, thumbs_signal, uses_history=True,
             description="Up or down on one choice: a label, and a pair with an opposite verdict on another choice.")


def thumbs_signal(feedback: Feedback, completion: CompletionRecord) -> Signal:
    payload: ThumbsFeedback = feedback.payload
    text = choice_text(completion, payload.choice)
    prompt = completion_prompt(completion)
    up = payload.value == "up"
    signal = Signal(labels=[Label(prompt=prompt, reply=text, good=up, choice=payload.choice)])
    latest = {earlier.payload.choice: earlier.payload.value for earlier in feedback.history}  # later ones win
    for other, value in sorted(latest.items()):
        if other == payload.choice or value == payload.value or other >= len(completion.choices):
            continue
        good, bad = (payload.choice, other) if up else (other, payload.choice)
        signal.pairs.append(PreferencePair(prompt=prompt, chosen=completion.choices[good].text,
                                           rejected=completion.choices[bad].text, chosen_choice=good,
                                           rejected_choice=bad))
    return signal
