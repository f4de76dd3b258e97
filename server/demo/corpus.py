"""Synthetic multi-topic, multi-style chat corpus for the offline demo model.

Every reply is about one of :data:`TOPICS` and written in one of :data:`STYLES`.
Both are recoverable from the text alone by :func:`classify`, which lets
simulated users express a style preference and lets tests watch RLHF move the
policy's style mix. Prompts never ask for a style, so a model pretrained on this
corpus produces each style at roughly ``1 / len(STYLES)``.

Prompts are ``template x subject`` combinations. A fixed quarter of the
combinations is held out: :func:`held_out_prompts` returns only those, and
:func:`generate_corpus` / :func:`training_prompts` never use them, so every
held-out prompt is a new phrasing of a subject the model has seen.

This module is pure Python (no torch) and does no work at import time beyond
building small constant tables.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

__all__ = [
    "STYLES",
    "TOPICS",
    "Dialogue",
    "Label",
    "Prompt",
    "classify",
    "generate_corpus",
    "held_out_prompts",
    "topic_of",
    "training_prompts",
]

TOPICS: tuple[str, ...] = ("cooking", "travel", "astronomy", "gardening", "music", "computers")
"""Reply topics, in a fixed order."""

STYLES: tuple[str, ...] = ("concise", "friendly", "formal", "enthusiastic")
"""Reply styles, in a fixed order."""

# One in _HOLD_OUT_EVERY (subject, template) combinations is held out of training.
_HOLD_OUT_EVERY = 4

_TEMPLATES: tuple[str, ...] = (
    "Can you tell me about {s}?",
    "What should I know about {s}?",
    "Any tips on {s}?",
    "I want to get into {s}. Where do I start?",
    "How do I get better at {s}?",
    "Give me some advice on {s}.",
    "What is the best way to approach {s}?",
    "I'm curious about {s}. Any pointers?",
    "Help me with {s}, please.",
    "What are common mistakes with {s}?",
    "Could you explain {s} to a beginner?",
    "I've been thinking about {s}. What do you suggest?",
    "Share a few ideas about {s}.",
    "Where should a beginner begin with {s}?",
    "What do experts say about {s}?",
    "Teach me something about {s}.",
)

_SUBJECTS: dict[str, tuple[str, ...]] = {
    "cooking": (
        "baking sourdough bread", "making fresh pasta", "roasting vegetables", "cooking rice",
        "making a curry", "grilling fish", "baking cookies", "making soup", "frying eggs",
        "seasoning a cast iron pan", "making pancakes", "braising beef",
    ),
    "travel": (
        "planning a road trip", "visiting Japan", "packing a carry-on bag", "booking cheap flights",
        "backpacking through Europe", "traveling by train", "finding a good hotel",
        "camping in a national park", "visiting Paris", "traveling with kids",
        "learning phrases for a trip abroad", "renting a car abroad",
    ),
    "astronomy": (
        "the planet Jupiter", "black holes", "the phases of the Moon", "finding constellations",
        "choosing a first telescope", "the rings of Saturn", "meteor showers", "distant galaxies",
        "solar eclipses", "the planet Mars", "the life of stars", "comets",
    ),
    "gardening": (
        "growing tomatoes", "planting roses", "starting a raised garden bed", "making compost",
        "pruning fruit trees", "growing herbs indoors", "caring for houseplants", "planting tulip bulbs",
        "keeping a lawn green", "growing potatoes", "attracting bees to the garden", "watering succulents",
    ),
    "music": (
        "learning the guitar", "playing the piano", "reading sheet music", "writing a song",
        "singing in tune", "learning jazz chords", "practicing the violin", "playing drums",
        "understanding music theory", "recording a song at home", "learning the ukulele", "joining a choir",
    ),
    "computers": (
        "building a gaming PC", "learning to code in Python", "speeding up a slow laptop", "backing up files",
        "choosing a new keyboard", "setting up a home network", "keeping a computer secure", "learning Linux",
        "upgrading memory", "building a website", "using the command line", "fixing a frozen program",
    ),
}

# Advice as bare verb phrases, so every style can wrap them in its own frame.
_FACTS: dict[str, tuple[str, ...]] = {
    "cooking": (
        "preheat the oven and measure every ingredient before you start",
        "season the dish with salt and taste the sauce as it simmers",
        "use a sharp knife so you can chop the onion and garlic evenly",
        "let the dough rest so the flour has time to relax",
        "warm the pan well before you add the butter",
        "follow the recipe closely the first time you cook it",
        "toast the spice blend in a dry skillet to bring out more flavor",
        "stir the pot often so nothing sticks to the bottom",
        "rest the meal for a few minutes before you serve the dish",
        "keep your kitchen tidy and clean as you cook",
    ),
    "travel": (
        "check that your passport and visa are valid well before the journey",
        "pack a small suitcase so your luggage fits in the overhead bin",
        "book the flight and hotel early to get a lower fare",
        "keep a simple itinerary with some free time in each city",
        "carry a paper map of the city in case you get lost",
        "learn a few local phrases to greet people at your destination",
        "exchange some currency before you arrive at the airport",
        "buy train tickets online to skip the lines at the station",
        "visit a museum or market to see how the locals live",
        "keep copies of your tickets and passport in a separate bag",
    ),
    "astronomy": (
        "find a dark site far from street lamps to see faint stars",
        "let your eyes adjust to the night sky for twenty minutes",
        "use binoculars before you buy a large telescope",
        "track the moon phase, since a full moon washes out faint objects",
        "learn the bright constellations first and use them as signposts",
        "remember that every planet follows its own orbit around the sun",
        "never look at the sun without a proper solar filter",
        "check when the planet rises above the horizon tonight",
        "join an astronomy club to look through a bigger telescope",
        "remember that gravity shapes every galaxy and nebula in the universe",
    ),
    "gardening": (
        "water the soil deeply in the morning rather than a little every day",
        "add mulch around each plant to keep the roots cool",
        "pull weeds while they are small and the soil is damp",
        "give each seedling plenty of sunlight near a bright window",
        "mix compost into the garden bed before you sow any seed",
        "prune dead branches in late winter before new leaves appear",
        "feed the plants with a gentle fertilizer once a month",
        "check the leaves for pests every few days",
        "plant flowers nearby so bees visit your garden",
        "rotate each crop every year so the soil stays healthy",
    ),
    "music": (
        "practice scales slowly with a metronome before you speed up",
        "learn a few basic chords and switch between them smoothly",
        "listen closely to the melody and hum it before you play",
        "tune your instrument every time you sit down to play",
        "keep a steady rhythm by counting the beat out loud",
        "warm up your voice with gentle humming before you sing",
        "write the lyrics first and then find a melody that fits",
        "play along with songs you enjoy to train your ear for pitch",
        "record yourself and listen back for timing and tone",
        "play a little music every day instead of once a week",
    ),
    "computers": (
        "back up important files to an external drive every week",
        "install software updates as soon as they are available",
        "use a long password and a password manager",
        "close programs you are not using to free up memory",
        "restart the router when the network feels slow",
        "learn a few terminal commands to work faster",
        "read the error message carefully before you debug the code",
        "keep the laptop vents clean so the processor stays cool",
        "check that new hardware is compatible with your computer",
        "write small programs every day to build your coding skill",
    ),
}

# Words that identify a topic. Disjoint across topics; matched as whole words
# after stripping simple plural endings (see _word_forms).
_TOPIC_KEYWORDS: dict[str, frozenset[str]] = {
    "cooking": frozenset(
        "bake baking bread sourdough dough pasta roast roasting vegetable rice curry grill grilling fish cookie "
        "soup fry frying egg skillet pancake batter braise braising beef recipe oven salt spice flavor sauce "
        "simmer knife kitchen ingredient taste butter garlic onion flour cook cooking season seasoning chop "
        "pan pot stir meal dish cast iron chef".split()
    ),
    "travel": frozenset(
        "travel traveling traveler trip road japan pack packing carry bag luggage suitcase book booking flight "
        "airport backpack backpacking europe train station hotel hostel camping tent national park paris kid "
        "phrase abroad rent renting car passport visa itinerary ticket destination tourist journey map museum "
        "city local fare currency overhead".split()
    ),
    "astronomy": frozenset(
        "astronomy astronomer planet jupiter hole moon phase constellation telescope saturn meteor galaxy "
        "galaxies solar eclipse mars star comet orbit sky night sun gravity universe space observatory nebula "
        "crater binoculars horizon signpost cosmic lunar".split()
    ),
    "gardening": frozenset(
        "garden gardening gardener grow growing tomato plant planting rose raised compost composting prune "
        "pruning fruit tree herb houseplant tulip bulb lawn potato bee pest succulent watering water soil seed "
        "seedling mulch root leaf leaves weed sunlight fertilizer bloom flower sow crop branch".split()
    ),
    "music": frozenset(
        "music musical musician guitar piano song sing singing singer tune jazz chord violin drum theory "
        "recording ukulele choir melody rhythm tempo metronome scale lyric strum string beat harmony "
        "instrument band concert vocal pitch humming hum voice tone".split()
    ),
    "computers": frozenset(
        "computer pc gaming code coding python program programming software laptop file backup keyboard network "
        "router wifi secure security linux memory ram website html command terminal cpu processor disk drive "
        "password update install bug debug browser server hardware error vent".split()
    ),
}


@dataclass(frozen=True)
class _Style:
    """How one style phrases a reply; ``markers`` are what :func:`classify` looks for."""

    openers: tuple[str, ...]
    """Opening sentences; ``{s}`` is the subject."""
    frames: tuple[str, ...]
    """Sentence frames for one piece of advice; ``{f}`` is a bare verb phrase, ``{F}`` the same capitalised."""
    closers: tuple[str, ...]
    """Closing sentences."""
    n_facts: tuple[int, int]
    """Inclusive range of advice sentences per reply."""
    markers: tuple[str, ...]
    """Lower-case phrases that signal this style."""


_STYLES: dict[str, _Style] = {
    "concise": _Style(
        openers=("In short, for {s}:", "Briefly, on {s}:", "Quick answer on {s}:"),
        frames=("{F}.",),
        closers=("Bottom line: keep it simple.", "Bottom line: start small.", "That is it."),
        n_facts=(2, 2),
        markers=("in short", "briefly", "quick answer", "bottom line", "keep it simple", "start small", "that is it"),
    ),
    "friendly": _Style(
        openers=(
            "Hi there! Happy to help with {s}.",
            "Hey friend, great question about {s}.",
            "Hello! I'd be glad to help you with {s}.",
        ),
        frames=("I'd suggest you {f}.", "It also helps to {f}.", "You might try to {f}."),
        closers=("Hope this helps, friend!", "Hope this helps, and have a lovely day!", "Take care, and good luck!"),
        n_facts=(2, 3),
        markers=(
            "hi there", "hey friend", "hello", "happy to help", "glad to help", "i'd suggest", "it also helps",
            "you might try", "hope this helps", "friend", "lovely day", "take care", "good luck",
        ),
    ),
    "formal": _Style(
        openers=(
            "Certainly. Regarding {s}, please consider the following.",
            "Thank you for your question regarding {s}.",
            "Regarding {s}, the following points are relevant.",
        ),
        frames=(
            "It is advisable to {f}.",
            "Furthermore, one should {f}.",
            "In addition, it is recommended to {f}.",
        ),
        closers=(
            "Kind regards.",
            "I trust this is useful. Kind regards.",
            "Should you require further detail, please ask.",
        ),
        n_facts=(2, 3),
        markers=(
            "certainly", "regarding", "please consider", "following points", "advisable", "furthermore",
            "one should", "in addition", "recommended", "kind regards", "i trust", "should you require",
        ),
    ),
    "enthusiastic": _Style(
        openers=(
            "Wow, {s} is such an exciting topic!",
            "Oh, I absolutely love {s}!",
            "Amazing question about {s}!",
        ),
        frames=(
            "Definitely {f}, it makes a huge difference!",
            "Seriously, {f}, it is awesome!",
            "Trust me, {f}, it is so rewarding!",
        ),
        closers=("Have a blast!!", "You've got this, go for it!!", "So much fun awaits!!"),
        n_facts=(2, 3),
        markers=(
            "wow", "exciting", "absolutely love", "amazing", "definitely", "huge difference", "seriously",
            "awesome", "trust me", "so rewarding", "have a blast", "go for it", "so much fun", "!!",
        ),
    ),
}

_WORD_RE = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Dialogue:
    """One single-turn training exchange and the labels it was generated with."""

    prompt: str
    reply: str
    topic: str
    style: str


@dataclass(frozen=True)
class Prompt:
    """A user prompt and the topic it asks about."""

    text: str
    topic: str


@dataclass(frozen=True)
class Label:
    """What :func:`classify` can tell about a text; ``None`` where it cannot tell."""

    topic: str | None
    style: str | None


def _is_held_out(subject_index: int, template_index: int) -> bool:
    """Whether a (subject, template) combination is reserved for evaluation."""
    return (subject_index + template_index) % _HOLD_OUT_EVERY == 0


def _combos(held_out: bool) -> list[tuple[str, str]]:
    """All (topic, prompt text) pairs on one side of the train / held-out split, in a fixed order."""
    pairs: list[tuple[str, str]] = []
    for topic in TOPICS:
        for i, subject in enumerate(_SUBJECTS[topic]):
            for j, template in enumerate(_TEMPLATES):
                if _is_held_out(i, j) == held_out:
                    pairs.append((topic, template.format(s=subject)))
    return pairs


def _capitalise(text: str) -> str:
    """Upper-case the first character only (``str.capitalize`` would lower-case proper nouns)."""
    return text[:1].upper() + text[1:]


def _make_reply(rng: random.Random, topic: str, subject: str, style: str) -> str:
    """Write one reply about ``subject`` in ``style``."""
    spec = _STYLES[style]
    facts = rng.sample(_FACTS[topic], rng.randint(*spec.n_facts))
    sentences = [_capitalise(rng.choice(spec.openers).format(s=subject))]
    for fact in facts:
        sentences.append(rng.choice(spec.frames).format(f=fact, F=_capitalise(fact)))
    sentences.append(rng.choice(spec.closers))
    return " ".join(sentences)


def _subject_of(topic: str, prompt_text: str) -> str:
    """The subject a generated prompt was built from (longest match, as subjects may share words)."""
    matches = [s for s in _SUBJECTS[topic] if s in prompt_text]
    return max(matches, key=len)


def generate_corpus(n: int, seed: int = 0) -> list[Dialogue]:
    """Generate ``n`` training dialogues, deterministically for ``seed``.

    Prompts (hence topics) are drawn uniformly from the training side of the
    split, never from :func:`held_out_prompts`; each drawn prompt is answered
    once in every style, so styles are balanced and independent of the prompt.
    """
    rng = random.Random(seed)
    combos = _combos(held_out=False)
    dialogues: list[Dialogue] = []
    while len(dialogues) < n:
        topic, prompt = rng.choice(combos)
        # Every drawn prompt gets each style once: sampling noise would otherwise tie some prompts to a
        # style, and a small model generalises that skew to new prompts.
        for style in rng.sample(STYLES, len(STYLES)):
            reply = _make_reply(rng, topic, _subject_of(topic, prompt), style)
            dialogues.append(Dialogue(prompt=prompt, reply=reply, topic=topic, style=style))
    rng.shuffle(dialogues)
    return dialogues[:n]


def training_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """Draw ``n`` prompts (with replacement) from the training side of the split."""
    rng = random.Random(seed)
    combos = _combos(held_out=False)
    return [Prompt(text=text, topic=topic) for topic, text in (rng.choice(combos) for _ in range(n))]


def held_out_prompts(n: int | None = None, seed: int = 0) -> list[Prompt]:
    """Prompts never used in training.

    With ``n=None`` returns all of them in a fixed order; otherwise a seeded
    sample of ``n`` distinct prompts (``n`` is capped at the number available).
    """
    prompts = [Prompt(text=text, topic=topic) for topic, text in _combos(held_out=True)]
    if n is None:
        return prompts
    return random.Random(seed).sample(prompts, min(n, len(prompts)))


def _word_forms(word: str) -> tuple[str, ...]:
    """A word and its naive singulars, so ``stars`` or ``galaxies`` hit ``star`` / ``galaxy``."""
    forms = [word]
    if word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s"):
        forms.append(word[:-1])
    return tuple(forms)


def _unique_argmax(scores: dict[str, int]) -> str | None:
    """The key with the single highest positive score, or ``None`` on zero or a tie."""
    best = max(scores.values(), default=0)
    if best <= 0:
        return None
    winners = [key for key, score in scores.items() if score == best]
    return winners[0] if len(winners) == 1 else None


def topic_of(text: str) -> str | None:
    """The topic ``text`` (a prompt or a reply) is about, or ``None`` if no topic clearly dominates."""
    scores = dict.fromkeys(TOPICS, 0)
    for word in _WORD_RE.findall(text.lower()):
        for topic in TOPICS:
            if any(form in _TOPIC_KEYWORDS[topic] for form in _word_forms(word)):
                scores[topic] += 1
    return _unique_argmax(scores)


@functools.cache
def _marker_pattern(marker: str) -> re.Pattern[str]:
    """Match a marker phrase on word boundaries where it starts or ends with a letter."""
    start = r"\b" if marker[0].isalnum() else ""
    end = r"\b" if marker[-1].isalnum() else ""
    return re.compile(start + re.escape(marker) + end)


def _style_of(text: str) -> str | None:
    """The style whose markers occur most often in ``text``, or ``None`` if none clearly wins."""
    lowered = text.lower()
    scores = {
        style: sum(len(_marker_pattern(m).findall(lowered)) for m in spec.markers) for style, spec in _STYLES.items()
    }
    return _unique_argmax(scores)


def classify(reply: str) -> Label:
    """Label any text with its topic and style; either is ``None`` when it cannot tell."""
    return Label(topic=topic_of(reply), style=_style_of(reply))
