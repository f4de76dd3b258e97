"""The hook specifications of alignd plugins (pluggy project name ``"alignd"``), and nothing else.

Plugins mark their implementations with :data:`hookimpl` (``from alignd import hookimpl``). An
implementation may take any subset of a hook's arguments, by name. Arguments are only ever added, never removed.
``docs/plugins.md`` has a tutorial and a reference section for every hook here (a test checks it).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from alignd.feedback.types import Feedback, PluginContext, RegisterKind, RegisterRoute, Rejection, Signal
    from alignd.store.records import CompletionRecord

hookspec = pluggy.HookspecMarker("alignd")
hookimpl = pluggy.HookimplMarker("alignd")


@hookspec
def register_feedback_kinds(register: RegisterKind) -> None:
    """Contribute feedback kinds.

    Fires once per app, at start, before the first request. Call
    ``register(name, payload, convert, *, description="", uses_history=False)`` once per kind: ``name`` is what
    clients send as ``"kind"``; ``payload`` is the msgspec Struct the kind's own body fields decode into (its field
    names may not be ``completion_id``, ``kind``, ``comment``, ``tags``, ``user`` or ``idempotency_key``);
    ``convert(feedback, completion) -> Signal`` validates the feedback against the stored completion (raising
    ``InvalidFeedback`` for a 422) and returns the training signal it yields. With ``uses_history=True``,
    ``feedback.history`` holds the earlier feedback of this kind on the same completion, oldest first.

    Returns nothing. A kind registered twice, by one plugin or two, is a start-up error naming both. Not firstresult:
    every plugin's implementation runs.
    """


@hookspec
def prepare_feedback(feedback: Feedback, completion: CompletionRecord) -> None:
    """Rewrite a feedback event before it is validated further and stored (redaction, normalisation).

    Fires for every well-formed feedback request on a known completion, before the kind's converter and before
    ``filter_feedback``. Change ``feedback`` in place (``feedback.comment``, fields of ``feedback.payload``); the
    converter and storage see the result.

    Returns nothing. Not firstresult: every implementation runs. It runs on the request path, off the event loop, in
    one of a few worker threads (several events' calls may overlap: guard shared state with a lock). An
    implementation that raises refuses the event (500 ``plugin_failed``; the others still run); the event's plugin
    calls together get ``hook_timeout_s``, past which it is refused (503 ``plugin_timeout``). Nothing is stored then.
    """


@hookspec
def redact_text(text: str) -> str | None:
    """Mask what must not leave the server in one text on its way out.

    Fires for every text that stored data sends out: the prompts (each message's content), the replies, comments,
    tags and the payload's text fields of the exports (``GET /v1/feedback/export``, every format), of
    ``GET /v1/feedback``, and of what ``on_feedback`` sinks receive (so the JSONL file and the webhook). The store
    and the trainer keep the texts as they are (``prepare_feedback`` is the hook that changes what is stored).

    Returns the masked text, or None to leave it unchanged. Not firstresult: alignd calls every implementation in
    turn, each on the previous one's result. It must be fast and must not block: exports call it for every line.
    """


@hookspec(firstresult=True)
def filter_feedback(feedback: Feedback, completion: CompletionRecord, context: PluginContext) -> Rejection | None:
    """Accept or reject a valid feedback event before anything is stored (spam, abuse, per-user quotas).

    Fires after the kind's converter has validated the feedback, before it is stored. Return ``None`` to let it
    through, or a ``Rejection(reason, code=..., status=422 | 429, retry_after=...)`` to refuse it: the client gets
    that status (a 429 with ``Retry-After`` when ``retry_after`` is set), and the rejection is counted in
    ``alignd_feedback_rejected_total{reason=code}``.

    firstresult: the first implementation that returns a rejection wins and the others are not called. It runs like
    ``prepare_feedback``: in a worker thread (guard shared state), within ``hook_timeout_s`` (else 503
    ``plugin_timeout``); one that raises refuses the event (500 ``plugin_failed``) after the others have run.
    """


@hookspec
def on_feedback(feedback: Feedback, completion: CompletionRecord, signal: Signal,
                context: PluginContext) -> Awaitable[None] | None:
    """See a feedback event after it is committed (sinks: files, queues, webhooks, dashboards).

    Fires after the event, its pairs and its labels are committed and the client has its answer, off the request
    path: each plugin has its own worker and bounded queue (``sink_queue_max``), so events reach one plugin in
    commit order. ``signal`` is what the kind's converter derived. May be a coroutine function; a plain function runs
    in the plugin's own thread.

    Returns nothing. Each call is time-boxed (``sink_timeout_s``); one that raises or times out is logged and
    counted (``alignd_sink_failures_total`` / ``alignd_sink_timeouts_total{plugin}``) and never fails the request
    or loses the stored event. Not firstresult: every implementation runs.
    """


@hookspec
def register_routes(register: RegisterRoute) -> None:
    """Add HTTP endpoints under ``/v1/plugins/<plugin name>/``.

    Fires once per app, at start. Call ``register(handler, *, auth="user")`` with a Litestar route handler (a function
    decorated with ``@get``, ``@post``, …; its path is relative to the plugin's prefix). ``auth`` is ``"user"`` (the
    API keys, like ``/v1/feedback``), ``"admin"`` (admin keys) or ``"none"`` (the handler checks callers itself, e.g.
    a webhook signature). A handler with a parameter ``feedback: NamedDependency[alignd.FeedbackSubmitter]`` (Litestar's
    ``litestar.di.NamedDependency``) receives the feedback service acting for the route's caller:
    ``await feedback.submit(body)`` stores feedback exactly as ``POST /v1/feedback`` does, ownership rules included
    (none on an ``auth="none"`` route: the handler vouches for it).
    (``request.app.state.feedback``, the way documented before, is the same service without a caller and still
    works.)

    Returns nothing. Not firstresult: every implementation runs.
    """


@hookspec
def startup(context: PluginContext) -> Awaitable[None] | None:
    """Set up per-app resources (open files, HTTP clients, background tasks).

    Fires once per app, after the store is open and before the first request. Keep what you create in
    ``context.state`` under your plugin's name: several apps may run in one process. May be a coroutine function.

    Returns nothing. An exception stops the server from starting (a misconfigured plugin should fail loudly). Not
    firstresult: every implementation runs.
    """


@hookspec
def shutdown(context: PluginContext) -> Awaitable[None] | None:
    """Release what ``startup`` created (flush, close, stop background tasks).

    Fires once per app when it stops, after pending ``on_feedback`` calls had a chance to finish, before the store
    closes. May be a coroutine function.

    Returns nothing. Exceptions are logged and do not stop other plugins' shutdown. Not firstresult: every
    implementation runs.
    """
