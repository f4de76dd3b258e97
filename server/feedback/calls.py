"""The request-path plugin calls of a feedback event, off the event loop and time-boxed.

``prepare_feedback``, the kind's converter and ``filter_feedback`` are plugin code on the request path. Run on the
event loop, one that blocks (a slow spam-check service, a lock, a bug) would freeze every request of the process,
chat and probes included. Here they run, one event's calls together, in a small pool of daemon threads
(:data:`HOOK_THREADS`), each event within ``hook_timeout_s``:

- a call that raises is logged and the event refused (500, ``plugin_failed``, naming the plugin and the hook); the
  other implementations of the hook still run, so that, e.g., every quota counts the event;
- an event whose calls outlast the timeout is refused (503, ``plugin_timeout``, naming the plugin running then),
  and its thread is left to finish on its own: daemon threads, so a call that never returns holds one thread and
  does not stop the process from exiting. With every thread held by hung calls, events wait in the queue until
  their timeout and are refused the same way: the number of threads stays bounded.

Nothing is stored for a refused event, and the client may retry it (same idempotency key).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from alignd.errors import AlignError, PluginFailed, PluginTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")

HOOK_THREADS = 4
"""Threads running request-path plugin calls: as many events' calls may run at once, or hang at once."""


class CallTrace:
    """Which plugin call an event is in (to name the culprit of a timeout), and the calls that raised."""

    def __init__(self) -> None:
        self.current = "no plugin call"
        self.failures: list[str] = []

    def call(self, plugin: str, hook: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Call one plugin function; an exception (other than a typed client error) is logged and remembered."""
        self.current = f"plugin {plugin!r} ({hook})"
        try:
            return function(*args, **kwargs)
        except AlignError:
            raise  # e.g. InvalidFeedback from a converter: the client's error, not the plugin's
        except Exception as exc:
            log.exception("plugin %r failed in %s", plugin, hook)
            self.failures.append(f"plugin {plugin!r} failed in {hook}: {type(exc).__name__}")
            return None

    def check(self) -> None:
        """Refuse the event if a call raised."""
        if self.failures:
            raise PluginFailed(f"The feedback was not stored: {'; '.join(self.failures)}.")


class PluginCalls:
    """A bounded pool of daemon threads for the request-path plugin calls, each event time-boxed."""

    def __init__(self, timeout_s: float, threads: int = HOOK_THREADS) -> None:
        self.timeout_s = timeout_s
        self._threads = threads
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue())
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, function: Callable[[CallTrace], T]) -> T:
        """``function(trace)`` in a worker thread within ``timeout_s``; raises :class:`PluginTimeout` past it."""
        self._start_workers()
        trace = CallTrace()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((lambda: function(trace), future))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            # wait_for cancelled the future: it never runs if it was still queued; if it was running, its thread
            # finishes it on its own and the result is dropped.
            where = "waiting for a free plugin thread" if future.cancelled() else trace.current
            log.error("feedback plugin calls took longer than %.1f s (%s): the event was refused", self.timeout_s,
                      where)
            raise PluginTimeout(f"The feedback was not stored: the server's feedback plugins did not answer within "
                                f"{self.timeout_s:g} s ({where}); retry later.") from None

    def close(self) -> None:
        """Let idle workers exit (hung ones are daemons: they do not hold the process)."""
        for _ in self._workers:
            self._jobs.put(None)
        self._workers.clear()

    def _start_workers(self) -> None:
        if len(self._workers) == self._threads:
            return
        with self._lock:
            while len(self._workers) < self._threads:
                worker = threading.Thread(target=self._work, name=f"alignd-plugin-{len(self._workers)}",
                                          daemon=True)
                worker.start()
                self._workers.append(worker)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, future = job
            if not future.set_running_or_notify_cancel():
                continue  # timed out while queued
            try:
                result = function()
            except BaseException as exc:  # handed to the waiting request
                future.set_exception(exc)
            else:
                future.set_result(result)
