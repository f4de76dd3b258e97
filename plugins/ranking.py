"""Feedback kind ``ranking``: a completion's choices ordered best first.

A full ranking of K choices implies all C(K,2) pairs; a prefix is a partial ranking: each ranked choice beats every
choice after it, ranked or not (unranked choices are not compared with each other). Each pair weighs 1/C(K,2), so
one ranking counts as much as one comparison however many choices it orders (InstructGPT).
"""

from __future__ import annotations

from math import comb

from alignd import (
    CompletionRecord,
    Feedback,
    InvalidFeedback,
    PreferencePair,
    RegisterKind,
    Signal,
    completion_prompt,
    hookimpl,
)
from alignd.protocol import RankingFeedback


@hookimpl
def register_feedback_kinds(register: RegisterKind) -> None:
    register("ranking", RankingFeedback, ranking_signal,
             description="Choices ordered best first (a prefix is a partial ranking): every implied pair.")


def ranking_signal(feedback: Feedback, completion: CompletionRecord) -> Signal:
    ranking: list[int] = feedback.payload.ranking
    n = len(completion.choices)
    if n < 2:
        raise InvalidFeedback(f"Completion {completion.id} has {n} choice; a ranking needs at least two.",
                              param="ranking")
    for position, index in enumerate(ranking):
        if index >= n:
            raise InvalidFeedback(f"ranking[{position}] is {index}, but the completion has {n} choices "
                                  f"(0…{n - 1}).", param="ranking")
    if len(set(ranking)) != len(ranking):
        repeated = next(i for i in ranking if ranking.count(i) > 1)
        raise InvalidFeedback(f"ranking must list distinct choices; {repeated} appears more than once.",
                              param="ranking")
    order = ranking + [i for i in range(n) if i not in ranking]
    prompt = completion_prompt(completion)
    weight = 1.0 / comb(n, 2)
    texts = [c.text for c in completion.choices]
    return Signal(pairs=[
        PreferencePair(prompt=prompt, chosen=texts[better], rejected=texts[worse], weight=weight,
                       chosen_choice=better, rejected_choice=worse)
        for position, better in enumerate(ranking) for worse in order[position + 1:]])
