"""Rule-checked reply traits and everyday chat prompts: simulated users' taste for any chat model.

The demo model's corpus classifier (:mod:`alignd.demo.corpus`) only reads the demo's own styles. A real instruct
model writes free text, so simulated users there prefer a *trait* that a plain rule can check in any reply. The
rules are deliberately simple and visible: a benchmark's claim ("the share of replies with the trait rose from 23%
to 51%") can be checked by anyone with the replies and this file. None of them is about length.

The prompts are everyday questions (a template about a topic). Topics are split: the training side is what the
users ask while the server learns, the held-out side is never asked there and measures the promoted policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from alignd.demo.corpus import Label, Prompt

__all__ = ["TRAITS", "Trait", "chat_prompts", "on_topic", "trait_label"]


@dataclass(frozen=True)
class Trait:
    """A property of a reply that users like, and the rule that checks it."""

    name: str
    description: str
    check: Callable[[str], bool]


_EXCLAMATION = re.compile(r"!(?!=)")  # "!=" in code is not enthusiasm
_QUESTION = re.compile(r"\?")
_ADDRESS = re.compile(r"\byou(?:r|rs|rself|'re|'ve|'ll|'d)?\b", re.IGNORECASE)
_FIRST_SENTENCE = re.compile(r"^.*?(?:[.!?](?=\s)|\n|$)", re.DOTALL)


def _first_sentence(text: str) -> str:
    match = _FIRST_SENTENCE.match(text.strip())
    return match.group(0) if match else ""


TRAITS: dict[str, Trait] = {
    t.name: t for t in (
        Trait("exclaims", "the reply contains an exclamation mark (enthusiasm)",
              lambda text: bool(_EXCLAMATION.search(text))),
        Trait("asks-back", "the reply asks the user a question (contains a question mark)",
              lambda text: bool(_QUESTION.search(text))),
        Trait("addresses-user", "the reply's first sentence speaks to the user (you, your, ...)",
              lambda text: bool(_ADDRESS.search(_first_sentence(text)))),
    )
}
"""The traits simulated users can prefer, by name."""

_TEMPLATES = (
    "Tell me something about {}.",
    "Can you give me a tip about {}?",
    "What should a beginner know about {}?",
    "Explain {} in simple words.",
    "Why do people like {}?",
    "What is the most surprising fact about {}?",
    "How do I get started with {}?",
    "What are common mistakes with {}?",
)

_TRAINING_TOPICS = (
    "coffee", "sleep", "running", "python programming", "the moon", "volcanoes", "saving money", "learning french",
    "houseplants", "bread baking", "chess", "rain", "cats", "the internet", "photosynthesis", "job interviews",
    "public speaking", "time management", "bicycles", "the ocean", "dinosaurs", "painting", "yoga", "tea",
    "electric cars", "birds", "camping", "jazz", "recycling", "gardening", "the stock market", "meditation",
    "podcasts", "mountains", "chocolate", "museums", "swimming", "video games", "honeybees", "knitting",
    "the roman empire", "solar panels", "cooking pasta", "writing poetry", "dogs", "board games", "the desert",
    "learning guitar",
)
_HELD_OUT_TOPICS = (
    "hiking", "pizza", "astronomy", "photography", "journaling", "trains", "mushrooms", "origami", "the arctic",
    "marathons", "libraries", "kites",
)


def chat_prompts(source: Literal["training", "held-out"]) -> list[Prompt]:
    """Every prompt of one side, in a fixed order: 384 training prompts (48 topics), 96 held-out (12 topics)."""
    topics = _HELD_OUT_TOPICS if source == "held-out" else _TRAINING_TOPICS
    return [Prompt(text=template.format(topic), topic=topic) for topic in topics for template in _TEMPLATES]


def on_topic(text: str, topic: str) -> bool:
    """Whether a reply mentions its topic: a content word of it (its first five letters, so plurals and "baking"
    for "bake" count)."""
    words = [w for w in re.findall(r"[a-z]+", topic.lower()) if w not in {"the", "of", "and"}]
    lowered = text.lower()
    return any(w[:5] in lowered for w in words)


def trait_label(text: str, prompt: Prompt, trait: Trait) -> Label:
    """A reply's label in the demo corpus's terms, so the same feedback rules apply: its style is the trait's name
    when it has the trait, its topic the prompt's when it mentions it."""
    return Label(topic=prompt.topic if on_topic(text, prompt.topic) else None,
                 style=trait.name if trait.check(text) else None)
