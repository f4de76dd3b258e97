"""Rule-checked traits and everyday prompts (``alignd.clients.traits``): the rules on hand-made replies, the prompt
split, and the simulated users' feedback rules applied to trait labels. The traits against the real instruct model
are exercised by ``tests/test_models.py`` and ``bench/alignment.py``."""

from __future__ import annotations

import pytest

from alignd.clients.simulate import PREFERENCES, Draws, decide_feedback, labeller, prompt_pool, run_simulation
from alignd.clients.traits import TRAITS, chat_prompts, on_topic, trait_label
from alignd.demo.corpus import Label, Prompt


@pytest.mark.parametrize(("name", "yes", "no"), [
    ("exclaims", ["What a great question! Coffee is...", "Enjoy your tea!"], ["Coffee is a drink.", "if a != b:"]),
    ("asks-back", ["Coffee is nice. Do you take milk?"], ["Coffee is a drink.", "Coffee! Yes."]),
    ("addresses-user", ["If you like coffee, try this. Beans are...", "Your cat is happy."],
     ["Coffee is a drink. You may like it.", "Cats purr."]),
])
def test_trait_rules(name: str, yes: list[str], no: list[str]) -> None:
    trait = TRAITS[name]
    assert [trait.check(t) for t in yes] == [True] * len(yes)
    assert [trait.check(t) for t in no] == [False] * len(no)


def test_prompt_sides_are_disjoint_and_fixed() -> None:
    training, held_out = chat_prompts("training"), chat_prompts("held-out")
    assert (len(training), len(held_out)) == (384, 96)
    assert not {p.topic for p in training} & {p.topic for p in held_out}
    assert len({p.text for p in training}) == 384 and chat_prompts("training") == training
    assert prompt_pool("held-out", "exclaims") == held_out
    assert prompt_pool("held-out", "friendly") != held_out, "a demo style keeps the corpus's prompts"


def test_on_topic_reads_a_content_word() -> None:
    assert on_topic("Baking bread at home is fun.", "bread baking")
    assert on_topic("Solar panel output depends on the sun.", "solar panels")
    assert not on_topic("The weather is nice.", "the roman empire")


def test_labels_feed_the_same_feedback_rules() -> None:
    prompt = Prompt("Tell me something about coffee.", "coffee")
    texts = ["Coffee is great!", "Coffee is a drink.", "Tea is lovely!"]
    labels = [labeller("exclaims")(t, prompt) for t in texts]
    assert labels == [Label("coffee", "exclaims"), Label("coffee", None), Label(None, "exclaims")]
    assert trait_label(texts[0], prompt, TRAITS["exclaims"]) == labels[0]
    ranking = Draws(prompt=prompt, n=3, kind="ranking", pair=(0, 1), thumbs_choice=0, tiebreak=(0.1, 0.2, 0.3),
                    user="sim-0")
    assert decide_feedback(ranking, labels, "exclaims") == ("ranking", {"ranking": [0, 2]})
    pairwise = Draws(prompt=prompt, n=3, kind="pairwise", pair=(1, 2), thumbs_choice=0, tiebreak=(0, 0, 0),
                     user="sim-0")
    assert decide_feedback(pairwise, labels, "exclaims") == ("pairwise", {"winner": 2, "choices": [1, 2]})


def test_every_trait_is_a_preference() -> None:
    assert set(TRAITS) <= set(PREFERENCES)
    from alignd.clients import Client

    with Client("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="exclaims"):
        run_simulation(client, prefer="shouts", requests=1)
