"""Alembic's entry point for its command line (``alembic revision --autogenerate``, ``alembic upgrade head``, run
from the repository root): the database is the one alignd is configured with (``alignd.toml``, ``ALIGND_DATABASE``),
or ``alembic -x url=<database URL> …``. The server itself does not go through here:
:func:`alignd.store.migrations.migrate` runs the same revisions when a store opens."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from alignd.config import load_settings
from alignd.store.store import async_url
from alignd.store.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or load_settings({}).database_url
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


asyncio.run(_main())
