"""Delivery of committed feedback to ``on_feedback`` implementations (sinks), off the request path.

Each plugin gets its own bounded queue and worker task, so a slow sink delays only itself and sees events in commit
order. Every call is time-boxed; a coroutine function runs on the event loop, a plain function in the plugin's own
daemon thread (a plain function that hangs cannot block the loop, nor the process's exit). A call that raises or
times out is logged and counted; the event is already stored, so nothing is lost but that sink's copy. The arguments
are prepared (redacted) once per event, by the first worker that reaches it, off the request path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pluggy

from alignd.feedback.manager import hook_impls
from alignd.metrics import Metrics

log = logging.getLogger(__name__)

_STOP = object()


class SinkDispatcher:
    """Hands each committed event to every current ``on_feedback`` implementation (looked up per event, so
    plugins registered at run time are served too)."""

    def __init__(self, hook: pluggy.HookCaller, metrics: Metrics, *, timeout_s: float, queue_max: int,
                 prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self._hook = hook
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._queue_max = queue_max
        self._prepare = prepare
        self._sinks: dict[tuple[str, Callable[..., Any]], _Sink] = {}

    def dispatch(self, **kwargs: Any) -> None:
        """Queue ``kwargs`` (the hook's arguments) for every sink; never blocks, never raises."""
        event = _Event(kwargs, self._prepare)
        for impl in hook_impls(self._hook):
            key = (impl.plugin_name, impl.function)
            sink = self._sinks.get(key)
            if sink is None:
                sink = self._sinks[key] = _Sink(impl, self._metrics, self._timeout_s, self._queue_max)
            sink.offer(event)

    async def close(self, grace_s: float) -> None:
        """Give queued events up to ``grace_s`` seconds to be delivered, then stop every worker."""
        sinks = list(self._sinks.values())
        if not sinks:
            return
        for sink in sinks:
            sink.stop()
        await asyncio.wait([sink.task for sink in sinks], timeout=grace_s)
        for sink in sinks:
            if not sink.task.done():
                log.warning("sink %s: %d event(s) not delivered at shutdown", sink.name, sink.queue.qsize())
                sink.task.cancel()
        await asyncio.gather(*(sink.task for sink in sinks), return_exceptions=True)


class _Event:
    """One committed event's hook arguments, prepared when a sink first needs them and then shared by all."""

    __slots__ = ("_prepare", "_prepared", "_raw")

    def __init__(self, raw: dict[str, Any], prepare: Callable[[dict[str, Any]], dict[str, Any]] | None) -> None:
        self._raw = raw
        self._prepare = prepare
        self._prepared: dict[str, Any] | None = None

    def arguments(self, names: Sequence[str]) -> dict[str, Any]:
        """The arguments a sink asks for. A failure to prepare them raises in every sink: nothing goes out raw."""
        if self._prepared is None:
            self._prepared = self._prepare(self._raw) if self._prepare is not None else self._raw
        return {name: self._prepared[name] for name in names}


class _Sink:
    def __init__(self, impl: pluggy.HookImpl, metrics: Metrics, timeout_s: float, queue_max: int) -> None:
        self.name = impl.plugin_name
        self.function = impl.function
        self.argnames = impl.argnames
        self.is_async = inspect.iscoroutinefunction(impl.function)
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[Any] = asyncio.Queue(queue_max)
        self.stopping = False
        self.thread: _Thread | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"alignd-sink-{self.name}")

    def offer(self, event: _Event) -> None:
        if self.stopping:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.metrics.sink_dropped.labels(self.name).inc()
            log.warning("sink %s is %d events behind: skipping an event (it stays stored)", self.name,
                        self.queue.maxsize)

    def stop(self) -> None:
        self.stopping = True
        try:
            self.queue.put_nowait(_STOP)
        except asyncio.QueueFull:
            pass  # close() cancels the worker after the grace period

    async def _run(self) -> None:
        try:
            while (event := await self.queue.get()) is not _STOP:
                await self._deliver(event)
        finally:
            if self.thread is not None:
                self.thread.stop()

    async def _deliver(self, event: _Event) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                kwargs = event.arguments(self.argnames)  # a failure withholds the event: nothing unredacted goes out
                if self.is_async:
                    await self.function(**kwargs)
                else:
                    if self.thread is None:
                        self.thread = _Thread(self.name)
                    result = await self.thread.call(self.function, kwargs)
                    if inspect.isawaitable(result):
                        await result
        except TimeoutError:
            self.metrics.sink_timeouts.labels(self.name).inc()
            log.error("sink %s took longer than %.1f s on an event; abandoned it (the event stays stored)",
                      self.name, self.timeout_s)
            if self.thread is not None and self.thread.busy:
                self.thread.abandon()  # it is stuck: the next event gets a fresh thread
                self.thread = None
        except Exception:
            self.metrics.sink_failures.labels(self.name).inc()
            log.exception("sink %s failed on an event (the event stays stored)", self.name)


class _Thread:
    """One daemon thread running a sink's plain-function calls in order."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.busy = False
        self._thread = threading.Thread(target=self._work, name=f"alignd-sink-{name}", daemon=True)
        self._thread.start()

    def call(self, function: Callable[..., Any], kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((loop, future, function, kwargs))
        return future

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, function, kwargs = call
            if future.cancelled():
                continue
            self.busy = True
            try:
                result, error = function(**kwargs), None
            except BaseException as e:
                result, error = None, e
            finally:
                self.busy = False
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    def stop(self) -> None:
        self._calls.put(None)

    def abandon(self) -> None:
        """Leave a stuck thread behind (it is a daemon); it stops after its current call if that ever returns."""
        self.stop()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
