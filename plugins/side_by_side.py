"""Feedback kind ``side_by_side``: the user's pick in a blind side-by-side of the canary and the promoted policy.

The payload and the training signal are ``pairwise``'s, but only a completion that was a side-by-side (its choices
came from two policy versions: ``--canary-side-by-side``) is accepted, and the two compared choices must come from
different versions: a pick meant to judge a canary cannot land unnoticed on an ordinary completion. A ``pairwise``
pick on a side-by-side counts for the canary too; this kind is for clients that want the refusal.
"""

from __future__ import annotations

from alignd import CompletionRecord, Feedback, InvalidFeedback, RegisterKind, Signal, hookimpl
from alignd.plugins.pairwise import pairwise_signal
from alignd.protocol import PairwiseFeedback


@hookimpl
def register_feedback_kinds(register: RegisterKind) -> None:
    register("side_by_side", PairwiseFeedback, side_by_side_signal,
             description="Winner of a blind side-by-side of the canary and the promoted policy (choices 0 and 1 by "
                         "default), or tie / both_bad; refused on a completion that was not one.")


def side_by_side_signal(feedback: Feedback, completion: CompletionRecord) -> Signal:
    versions = completion.params.get("side_by_side")
    if not isinstance(versions, list):
        raise InvalidFeedback(f"Completion {completion.id} was not a side-by-side (its choices are all from one "
                              "policy version); send kind 'pairwise' to compare its choices.",
                              param="completion_id", code="not_side_by_side")
    first, second = feedback.payload.choices
    if max(first, second) < len(versions) and versions[first] == versions[second]:
        raise InvalidFeedback(f"choices {feedback.payload.choices} of completion {completion.id} come from the same "
                              "policy version; a side-by-side pick compares one choice of each.", param="choices",
                              code="not_side_by_side")
    return pairwise_signal(feedback, completion)
