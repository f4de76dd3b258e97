"""Test harness: one background event loop that owns the real vLLM engine, with alignd apps served on it by uvicorn.

The engine is started once per test session (about 40 s on CPU); each app (SQLite, PostgreSQL, with keys...) is
a uvicorn server on its own port sharing that engine, so tests drive real HTTP with sync clients (httpx, openai).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import uvicorn
from litestar import Litestar

from alignd.services import Services

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 600) -> T:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class AppServer:
    """A uvicorn server for one app, running as a task on the loop thread."""

    def __init__(self, loop: LoopThread, app: Litestar) -> None:
        self.loop = loop
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self._task: Future[None] | None = None

    def start(self) -> AppServer:
        self._task = self.loop.submit(self.server.serve())
        self.loop.run(self._wait_started(), timeout=120)
        return self

    async def _wait_started(self) -> None:
        while not self.server.started:
            if self._task is not None and self._task.done():
                self._task.result()
                raise RuntimeError("server exited during start")
            await asyncio.sleep(0.05)

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def state(self) -> Services:
        """The app's services (what its lifespan opened)."""
        return self.app.state.services

    def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            self._task.result(timeout=60)
