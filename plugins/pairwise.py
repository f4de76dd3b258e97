"""Feedback kind ``pairwise``: a side-by-side choice between two of a completion's choices.

``winner`` is the better choice's index (one pair), ``tie`` (no signal), or ``both_bad`` (a bad label for each).
The event is stored and exported either way.
"""

from __future__ import annotations

from alignd import (
    CompletionRecord,
    Feedback,
    InvalidFeedback,
    Label,
    PreferencePair,
    RegisterKind,
    Signal,
    completion_prompt,
    hookimpl,
)
from alignd.protocol import PairwiseFeedback


@hookimpl
def register_feedback_kinds(register: RegisterKind) -> None:
    register("pairwise", PairwiseFeedback, pairwise_signal,
             description="Winner of two choices (default 0 and 1), or tie / both_bad.")


def pairwise_signal(feedback: Feedback, completion: CompletionRecord) -> Signal:
    payload: PairwiseFeedback = feedback.payload
    n = len(completion.choices)
    first, second = payload.choices
    if n < 2:
        raise InvalidFeedback(f"Completion {completion.id} has {n} choice; pairwise feedback needs two.",
                              param="choices")
    if first == second:
        raise InvalidFeedback("choices must name two different choices.", param="choices")
    if max(first, second) >= n:
        raise InvalidFeedback(f"choices are {payload.choices}, but the completion has {n} choices (0…{n - 1}).",
                              param="choices")
    prompt = completion_prompt(completion)
    if payload.winner == "tie":
        return Signal()
    if payload.winner == "both_bad":
        return Signal(labels=[Label(prompt=prompt, reply=completion.choices[i].text, good=False, choice=i)
                              for i in (first, second)])
    if payload.winner not in (first, second):
        raise InvalidFeedback(f"winner is {payload.winner}, which is not one of the compared choices "
                              f"{payload.choices} (or 'tie', 'both_bad').", param="winner")
    loser = second if payload.winner == first else first
    return Signal(pairs=[PreferencePair(prompt=prompt, chosen=completion.choices[payload.winner].text,
                                        rejected=completion.choices[loser].text, chosen_choice=payload.winner,
                                        rejected_choice=loser)])
