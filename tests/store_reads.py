"""Reads of stored completions that only the tests need (the server never reads a completion back whole): what a
chat request left in the store, through the store's own engine."""

from __future__ import annotations

from sqlalchemy import func, select

from alignd.store import ChoiceRecord, CompletionRecord, Store
from alignd.store.tables import choices, completions


async def get_completion(store: Store, completion_id: str) -> CompletionRecord | None:
    """The stored completion with its choices (token ids included), or None."""
    async with store.engine.connect() as conn:
        row = (await conn.execute(select(completions).where(completions.c.id == completion_id))).first()
        if row is None:
            return None
        rows = await conn.execute(select(choices).where(choices.c.completion_id == completion_id)
                                  .order_by(choices.c.index))
        return CompletionRecord(**{k: v for k, v in row._mapping.items()}, choices=[
            ChoiceRecord(index=c.index, text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason)
            for c in rows])


async def count_completions(store: Store) -> int:
    async with store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(completions))).scalar_one()
