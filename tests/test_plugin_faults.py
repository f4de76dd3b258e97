"""Feedback plugins that hang or raise on the request path (``prepare_feedback``, ``filter_feedback``), on the real
server and engine: the event loop stays free (``/health``, other users' chat and feedback answer while a hook
hangs), the event is refused clearly (503 ``plugin_timeout`` / 500 ``plugin_failed``, naming the plugin) and nothing
of it is stored, the other plugins still run, and hung calls hold a bounded number of threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from alignd import CompletionRecord, Feedback, Rejection, hookimpl
from alignd.feedback.calls import HOOK_THREADS
from tests.serverkit import AppServer
from tests.test_feedback_api import complete, metric, send


class HangingFilter:
    """Blocks the events whose comment is "hang" until released."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    @hookimpl
    def filter_feedback(self, feedback: Feedback) -> Rejection | None:
        if feedback.comment == "hang":
            self.entered.release()
            self.release.wait(120)
        return None


class RaisingPrepare:
    @hookimpl
    def prepare_feedback(self, feedback: Feedback) -> None:
        if feedback.comment == "boom":
            raise RuntimeError("prepare is broken")


class RaisingFilter:
    @hookimpl
    def filter_feedback(self, feedback: Feedback) -> Rejection | None:
        if feedback.comment == "boom":
            raise RuntimeError("filter is broken")
        return None


class CountingFilter:
    """Another plugin's filter: counts the events it sees (a quota would)."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    @hookimpl
    def filter_feedback(self, feedback: Feedback, completion: CompletionRecord) -> Rejection | None:
        self.seen.append(feedback.comment)
        return None


@pytest.fixture(scope="module")
def srv(make_server: Callable[..., AppServer]) -> AppServer:
    return make_server(admin_keys=["admin-key"], plugins={"hook_timeout_s": 2.0})


@pytest.fixture
def plugins(srv: AppServer) -> Iterator[Callable[[str, Any], Any]]:
    """``add(name, plugin)`` registers a plugin on the running app for this test."""
    names: list[str] = []

    def add(name: str, plugin: Any) -> Any:
        srv.state.plugins.register(plugin, name=name)
        names.append(name)
        return plugin

    yield add
    for name in names:
        srv.state.plugins.unregister(name=name)


def stored(srv: AppServer, completion_id: str) -> list[Any]:
    return srv.loop.run(srv.state.store.list_feedback(completion_id=completion_id))


def test_a_hanging_filter_leaves_the_server_answering_and_refuses_its_event(
        srv: AppServer, plugins: Callable[[str, Any], Any]) -> None:
    hanging = plugins("hanging", HangingFilter())
    cid, _ = complete(srv)
    other_cid, _ = complete(srv)
    timeouts = metric(srv, 'alignd_feedback_rejected_total{reason="plugin_timeout"}')
    with ThreadPoolExecutor(1) as pool:
        pending: Future[httpx.Response] = pool.submit(send, srv, completion_id=cid, kind="thumbs", value="up",
                                                      comment="hang", idempotency_key="hang-1")
        try:
            assert hanging.entered.acquire(timeout=60), "the hook never ran"
            # While the hook blocks its thread, the event loop serves everyone else.
            assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
            chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
                "model": "alignd", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                "user": "someone-else"})
            assert chat.status_code == 200, chat.text
            fine = send(srv, completion_id=other_cid, kind="thumbs", value="down", user="someone-else")
            assert fine.status_code == 201, fine.text
            assert not pending.done(), "the hung event must still be waiting on its hook"
            refused = pending.result(timeout=60)
        finally:
            hanging.release.set()
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "plugin_timeout" and "'hanging'" in error["message"]
    assert "filter_feedback" in error["message"]
    assert stored(srv, cid) == []  # nothing of it was stored
    assert [e.id for e in stored(srv, other_cid)] == [fine.json()["id"]]
    assert metric(srv, 'alignd_feedback_rejected_total{reason="plugin_timeout"}') == timeouts + 1
    # Once the hook is fixed (released), the same request, retried with its key, is stored.
    retry = send(srv, completion_id=cid, kind="thumbs", value="up", comment="hang", idempotency_key="hang-1")
    assert retry.status_code == 201, retry.text
    assert [e.id for e in stored(srv, cid)] == [retry.json()["id"]]


@pytest.mark.parametrize("hook", ["prepare_feedback", "filter_feedback"])
def test_a_raising_hook_refuses_its_event_and_the_other_plugins_still_run(
        srv: AppServer, plugins: Callable[[str, Any], Any], hook: str) -> None:
    counting = plugins("counting", CountingFilter())
    plugins("raising", RaisingPrepare() if hook == "prepare_feedback" else RaisingFilter())  # called first: newest
    cid, _ = complete(srv)
    failed = send(srv, completion_id=cid, kind="thumbs", value="up", comment="boom")
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["code"] == "plugin_failed" and error["type"] == "server_error"
    assert "'raising'" in error["message"] and hook in error["message"]
    assert stored(srv, cid) == []
    # A raising filter does not stop the next one (the counter saw the event); a raising prepare_feedback stops the
    # event before any filter.
    assert counting.seen == (["boom"] if hook == "filter_feedback" else [])
    ok = send(srv, completion_id=cid, kind="thumbs", value="up", comment="fine")
    assert ok.status_code == 201, ok.text
    assert counting.seen[-1] == "fine"
    assert httpx.get(f"{srv.url}/ready", timeout=30).status_code == 200


def test_hung_hooks_hold_a_bounded_number_of_threads(srv: AppServer, plugins: Callable[[str, Any], Any]) -> None:
    hanging = plugins("hanging", HangingFilter())
    # One completion each: events on one completion of a kind with history (thumbs) take turns.
    cids = [complete(srv)[0] for _ in range(HOOK_THREADS + 2)]
    before = {t.name for t in threading.enumerate()}
    with ThreadPoolExecutor(HOOK_THREADS + 2) as pool:
        try:
            hung = [pool.submit(send, srv, completion_id=cid, kind="thumbs", value="up", comment="hang")
                    for cid in cids]
            for _ in range(HOOK_THREADS):  # every plugin thread is now held by a hung call
                assert hanging.entered.acquire(timeout=60)
            responses = [f.result(timeout=120) for f in hung]
        finally:
            hanging.release.set()
    assert all(r.status_code == 503 and r.json()["error"]["code"] == "plugin_timeout" for r in responses)
    # The two events beyond the pool waited for a thread, and say so.
    assert sum("waiting for a free plugin thread" in r.json()["error"]["message"] for r in responses) >= 2
    plugin_threads = [t for t in threading.enumerate() if t.name.startswith("alignd-plugin-")]
    assert len({t.name for t in plugin_threads} - before) <= HOOK_THREADS
    assert all(t.daemon for t in plugin_threads)  # a hook that never returns cannot hold the process's exit
    assert all(stored(srv, cid) == [] for cid in cids)
