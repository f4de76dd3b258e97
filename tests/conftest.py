"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import pgserver


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL (with user and password) of a PostgreSQL server's ``postgres`` database, for the whole session.

    ``ALIGND_TEST_POSTGRES_URL`` names an existing server (the user must be allowed to CREATE DATABASE);
    otherwise a throwaway cluster is started (see ``tests/pgserver.py``) and removed at the end.
    Fails, never skips, when no PostgreSQL can be found or started.
    """
    existing = os.environ.get("ALIGND_TEST_POSTGRES_URL")
    if existing:
        yield existing
        return
    try:
        # fsync off: test data need not survive a power loss, and the suite runs several times faster.
        server = pgserver.start_postgres(settings={"fsync": "off", "full_page_writes": "off"})
    except pgserver.PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL is required for these tests and could not be started: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


# The real engine and apps served on it (started once per session).
from tests.engine_fixtures import engine, engine_loop, make_server, pg_server, server  # noqa: E402, F401
