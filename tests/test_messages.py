# ruff: noqa: F811 - the store fixtures are imported from test_store and used as parameters
"""One way to make stored request messages plain, shared by serving, the feedback export and the trainer: the
trainer renders a prompt exactly as the feedback path and serving see it (it used to keep OpenAI's ``developer``
role, which chat templates do not know, where the others said ``system``)."""

from __future__ import annotations

from alignd import completion_prompt
from alignd.messages import plain_messages
from alignd.store import Store
from alignd.trainer.config import DataConfig
from alignd.trainer.data import load_training_data
from tests.test_store import make_record, store, store_url  # noqa: F401 - the fixtures, on both databases

DEVELOPER = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
PLAIN = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "ab"}]


def test_parts_are_joined_and_developer_is_system() -> None:
    assert plain_messages(DEVELOPER) == PLAIN
    assert plain_messages([{"role": "assistant", "content": None}]) == [{"role": "assistant", "content": ""}]


async def test_the_trainer_sees_the_prompt_the_feedback_path_sees(store: Store) -> None:
    record = make_record(1, messages=DEVELOPER)
    await store.record_completion(record)
    data = await load_training_data(store, DataConfig(max_prompts=10))
    assert data.ppo_prompts + data.gate_prompts == [completion_prompt(record)] == [PLAIN]
