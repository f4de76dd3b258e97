"""Session fixtures around the real vLLM engine: imported by ``tests/conftest.py``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from alignd.config import Settings, load_settings
from tests.serverkit import AppServer, LoopThread

# Light engine settings for a 2-core test machine; the model is the demo model built once per session.
TEST_ENGINE = {"max_model_len": 512, "kv_cache_space_gib": 1, "max_loras": 2, "max_lora_rank": 8,
               "max_num_seqs": 64}


def test_settings(model: Path | str, data_dir: Path, **server: Any) -> Settings:
    """Settings for a test app: the given model, a private data dir, the light engine, ``server`` overrides
    (``database=URL``, and ``plugins={...}`` / ``trainer={...}`` / ``store={...}`` for those sections)."""
    database = server.pop("database", None)
    plugins = server.pop("plugins", None)
    trainer = server.pop("trainer", None)
    store = server.pop("store", None)
    tree: dict[str, Any] = {"model": str(model), "data_dir": str(data_dir), "engine": dict(TEST_ENGINE),
                            "server": {"port": 0, **server}}
    if database or store:
        tree["store"] = {**({"database": database} if database else {}), **(store or {})}
    if plugins:
        tree["plugins"] = plugins
    # No automatic training runs unless a test asks: they would load the shared engine behind other tests' backs.
    tree["trainer"] = {"training_trigger": "manual", **(trainer or {})}
    return load_settings(tree, environ={})


@pytest.fixture(scope="session")
def engine_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.stop()


@pytest.fixture(scope="session")
def engine(engine_loop: LoopThread, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real engine on the demo model, shared by every app of the session."""
    from alignd.engine.vllm_engine import VLLMEngine

    settings = test_settings(demo_model_dir, tmp_path_factory.mktemp("engine"))
    eng = engine_loop.run(VLLMEngine.start(str(demo_model_dir), settings.engine))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def make_server(engine_loop: LoopThread, engine: Any, demo_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., AppServer]]:
    """Factory: ``make_server(**server_settings)`` serves a new app (own data dir and store) on the shared engine."""
    from alignd.app import create_app

    servers: list[AppServer] = []

    def make(**server: Any) -> AppServer:
        settings = test_settings(demo_model_dir, tmp_path_factory.mktemp("app"), **server)
        app_server = AppServer(engine_loop, create_app(settings, engine=engine)).start()
        servers.append(app_server)
        return app_server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def server(make_server: Callable[..., AppServer]) -> AppServer:
    """The default app: SQLite store, no keys."""
    return make_server()


@pytest.fixture(scope="session")
def pg_server(make_server: Callable[..., AppServer], postgres_server_url: str) -> AppServer:
    """The same app on a fresh PostgreSQL database."""
    return make_server(database=create_pg_database(postgres_server_url, f"serving_{uuid.uuid4().hex[:8]}"))


def create_pg_database(server_url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server and return its URL."""
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)

    async def create() -> None:
        conn = await asyncpg.connect(user=url.username, password=url.password, host=url.host, port=url.port,
                                     database=url.database or "postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return url.set(database=name).render_as_string(hide_password=False)
