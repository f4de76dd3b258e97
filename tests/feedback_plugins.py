"""Plugins used by the feedback tests: loaded through ``plugin_modules`` ("tests.feedback_plugins:<name>") or
registered on a running app's plugin manager for one test."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from litestar import Request, post
from litestar.di import NamedDependency

from alignd import (
    CompletionRecord,
    Feedback,
    FeedbackSubmitter,
    PluginContext,
    RegisterKind,
    RegisterRoute,
    Rejection,
    Signal,
    hookimpl,
)
from alignd.errors import Unauthorized
from alignd.protocol import ThumbsFeedback


class DuplicateThumbs:
    """Registers a second ``thumbs`` kind: the server must refuse to start."""

    @hookimpl
    def register_feedback_kinds(self, register: RegisterKind) -> None:
        register("thumbs", ThumbsFeedback, lambda feedback, completion: Signal())


class Misspelt:
    """Implements a hook that does not exist."""

    @hookimpl
    def on_feedbak(self, feedback: Feedback) -> None:
        pass


class Recorder:
    """A sink that remembers what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    @hookimpl
    async def on_feedback(self, feedback: Feedback, signal: Signal) -> None:
        self.seen.append((feedback.id, len(signal.pairs), len(signal.labels)))


class FailingSink:
    @hookimpl
    def on_feedback(self, feedback: Feedback) -> None:
        raise RuntimeError(f"sink is broken ({feedback.id})")


class HangingSink:
    """An async sink that never returns."""

    @hookimpl
    async def on_feedback(self, feedback: Feedback) -> None:
        await asyncio.sleep(3600)


class BlockingSink:
    """A plain-function sink that blocks its thread until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def on_feedback(self, feedback: Feedback) -> None:
        self.release.wait(60)


class SpamFilter:
    """Rejects comments that advertise."""

    @hookimpl
    def filter_feedback(self, feedback: Feedback, completion: CompletionRecord) -> Rejection | None:
        if feedback.comment and "buy now" in feedback.comment.lower():
            return Rejection(reason="Advertising is not feedback.", code="spam", param="comment")
        return None


class Reactions:
    """A webhook receiver: a chat platform's 👍/👎 reaction on a reply becomes ``thumbs`` feedback."""

    TOKEN = "reaction-secret"

    @hookimpl
    def register_routes(self, register: RegisterRoute) -> None:
        register(reaction, auth="none")  # the platform cannot send our API key; it sends a shared token
        register(reaction_via_state, auth="none")

    @hookimpl
    def startup(self, context: PluginContext) -> None:
        context.state["reactions"] = {"started": time.time()}


@post("/reaction", status_code=201)
async def reaction(request: Request[Any, Any, Any], feedback: NamedDependency[FeedbackSubmitter]) -> dict[str, Any]:
    if request.headers.get("x-reaction-token") != Reactions.TOKEN:
        raise Unauthorized("Bad reaction token.")
    created, _ = await feedback.submit(_thumbs(await request.json()))
    return {"feedback_id": created.id}


@post("/reaction-via-state", status_code=201)
async def reaction_via_state(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The same through ``request.app.state.feedback``, the way plugin routes were first told to store feedback."""
    if request.headers.get("x-reaction-token") != Reactions.TOKEN:
        raise Unauthorized("Bad reaction token.")
    created, _ = await request.app.state.feedback.submit(_thumbs(await request.json()))
    return {"feedback_id": created.id}


class Stars:
    """A route for the client API's callers (``auth="user"``): a star is ``thumbs`` up, stored for the caller, whose
    ownership rules apply as on ``POST /v1/feedback``."""

    @hookimpl
    def register_routes(self, register: RegisterRoute) -> None:
        register(star)


@post("/star", status_code=201)
async def star(request: Request[Any, Any, Any], feedback: NamedDependency[FeedbackSubmitter]) -> dict[str, Any]:
    body = await request.json()
    created, _ = await feedback.submit({"completion_id": body["completion_id"], "kind": "thumbs", "value": "up"})
    return {"feedback_id": created.id}


def _thumbs(body: dict[str, Any]) -> dict[str, Any]:
    return {"completion_id": body["completion_id"], "kind": "thumbs",
            "value": "up" if body["emoji"] == "+1" else "down", "tags": ["reaction"], "user": body.get("user")}


duplicate_thumbs = DuplicateThumbs
misspelt = Misspelt
spam_filter = SpamFilter
reactions = Reactions
stars = Stars
