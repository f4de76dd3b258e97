"""Feedback kind ``rating``: a 1–10 score of one choice.

Against the latest rating of every other choice of the same completion with a different score, a preference pair
with margin (difference / 9, so in (0, 1], like Llama 2's rating margins). A clear score is also an unpaired label:
8 or more is good, 3 or less is bad.
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
from alignd.protocol import RatingFeedback

GOOD_FROM = 8
BAD_UP_TO = 3


@hookimpl
def register_feedback_kinds(register: RegisterKind) -> None:
    register("rating", RatingFeedback, rating_signal, uses_history=True,
             description="1-10 score of one choice: pairs with differently rated choices, labels for clear scores.")


def rating_signal(feedback: Feedback, completion: CompletionRecord) -> Signal:
    payload: RatingFeedback = feedback.payload
    text = choice_text(completion, payload.choice)
    prompt = completion_prompt(completion)
    signal = Signal()
    if payload.score >= GOOD_FROM or payload.score <= BAD_UP_TO:
        signal.labels.append(Label(prompt=prompt, reply=text, good=payload.score >= GOOD_FROM,
                                   choice=payload.choice))
    latest = {earlier.payload.choice: earlier.payload.score for earlier in feedback.history}
    for other, score in sorted(latest.items()):
        if other == payload.choice or score == payload.score or other >= len(completion.choices):
            continue
        better, worse = (payload.choice, other) if payload.score > score else (other, payload.choice)
        signal.pairs.append(PreferencePair(prompt=prompt, chosen=completion.choices[better].text,
                                           rejected=completion.choices[worse].text,
                                           margin=abs(payload.score - score) / 9, chosen_choice=better,
                                           rejected_choice=worse))
    return signal
