"""The feedback service: decode a feedback body for its kind, let plugins rewrite, convert and filter it, store it
with its training signal (acknowledged only after the commit), hand it to sinks, and list and export what is stored.

Order of a submission: common fields → who it acts for (``user``, 403) → kind → the kind's payload → completion
(404) and whether the caller may judge it (403; see :mod:`alignd.principals`) → idempotency replay →
``prepare_feedback`` → the kind's converter (validation, 422) → ``filter_feedback`` (422/429) → group commit →
201 → ``on_feedback`` sinks in the background. The three plugin steps run off the event loop, time-boxed
(:mod:`alignd.feedback.calls`: 500 ``plugin_failed``, 503 ``plugin_timeout``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec
import pluggy

from alignd.config import Settings
from alignd.decoding import convert
from alignd.errors import (
    AlignError,
    Conflict,
    InvalidFeedback,
    NotFound,
    PluginFailed,
    PluginTimeout,
    RateLimited,
    Unprocessable,
)
from alignd.feedback.calls import CallTrace, PluginCalls
from alignd.feedback.manager import PluginError, call_impl, collect_feedback_kinds, hook_impls, maybe_await
from alignd.feedback.redaction import Redactor
from alignd.feedback.sinks import SinkDispatcher
from alignd.feedback.types import (
    Feedback,
    FeedbackKind,
    PluginContext,
    Rejection,
    Signal,
    iso,
    payload_choice,
)
from alignd.messages import plain_messages
from alignd.metrics import Metrics
from alignd.principals import Principal, acting_user, check_may_judge
from alignd.protocol import (
    FEEDBACK_COMMON_FIELDS,
    ExportQuery,
    FeedbackBucket,
    FeedbackCreated,
    FeedbackEvent,
    FeedbackList,
    FeedbackQuery,
    FeedbackRequest,
    FeedbackStats,
    FeedbackStatsQuery,
    KTOLine,
    PreferenceLine,
)
from alignd.store import (
    CompletionRecord,
    FeedbackRecord,
    RecordRejectedError,
    Store,
    StoredFeedback,
)

log = logging.getLogger(__name__)

# Completions never change once stored, so recently judged ones are kept (texts only) to spare a read per event.
_COMPLETION_CACHE_SIZE = 4096
# Histories (earlier events of a kind on a completion) kept in memory, on the embedded store only.
_HISTORY_CACHE_SIZE = 8192
_EXPORT_PAGE = 500
# What GET /v1/feedback/stats covers when no ``since`` is given.
_STATS_WINDOW = {"hour": timedelta(hours=48), "day": timedelta(days=30)}


class Submitted(NamedTuple):
    created: FeedbackCreated
    replayed: bool
    """True when an earlier request with the same idempotency key and body is answered again."""


def assistant(text: str) -> list[dict[str, str]]:
    """A reply as TRL's conversational completion: one assistant message."""
    return [{"role": "assistant", "content": text}]


class FeedbackService:
    """Feedback through the plugins into the store, and back out as events, preference pairs and KTO labels."""

    def __init__(self, store: Store, pm: pluggy.PluginManager, metrics: Metrics, settings: Settings, *,
                 kinds: dict[str, FeedbackKind] | None = None) -> None:
        self.store = store
        self.pm = pm
        self.metrics = metrics
        self.context = PluginContext(settings, metrics, store=store)
        self.kinds: dict[str, FeedbackKind] = collect_feedback_kinds(pm) if kinds is None else kinds
        self.redactor = Redactor(pm.hook.redact_text)
        self.sinks = SinkDispatcher(pm.hook.on_feedback, metrics, timeout_s=settings.plugins.sink_timeout_s,
                                    queue_max=settings.plugins.sink_queue_max, prepare=self.redactor.sink_arguments)
        self._completions: OrderedDict[str, CompletionRecord] = OrderedDict()
        # On SQLite this process makes every write, so a history read once stays exact if we append what we
        # commit; with PostgreSQL other replicas write too, and history is read from the database each time.
        self._histories: OrderedDict[tuple[str, str], list[Feedback]] | None = (
            OrderedDict() if store.embedded else None)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.calls = PluginCalls(settings.plugins.hook_timeout_s)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Run every plugin's ``startup``; a failure stops the server from starting."""
        for impl in hook_impls(self.pm.hook.startup):
            try:
                await maybe_await(call_impl(impl, context=self.context))
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed to start: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Let sinks finish (up to ``sink_timeout_s``), then run every plugin's ``shutdown``."""
        timeout = self.context.settings.plugins.sink_timeout_s
        self.calls.close()
        await self.sinks.close(timeout)
        for impl in hook_impls(self.pm.hook.shutdown):
            try:
                await asyncio.wait_for(maybe_await(call_impl(impl, context=self.context)), timeout)
            except Exception:
                log.exception("plugin %s failed to shut down", impl.plugin_name)

    def forget_cached(self) -> None:
        """Drop the completions and histories kept in memory: stored rows were deleted."""
        self._completions.clear()
        if self._histories is not None:
            self._histories.clear()

    # --- submission ------------------------------------------------------------------------------------------

    async def submit(self, body: dict[str, Any], *, idempotency_key: str | None = None,
                     principal: Principal | None = None) -> Submitted:
        """Validate, convert, filter and store one feedback body (a decoded JSON object); see the module doc.

        ``idempotency_key`` is the ``Idempotency-Key`` header, if any. ``principal`` is the caller, whose
        ownership rules apply; None (no key, or trusted server-side code) judges any completion. Raises the typed
        errors of :mod:`alignd.errors`.
        """
        try:
            return await self._submit(body, idempotency_key, principal)
        except (Unprocessable, RateLimited, PluginFailed, PluginTimeout) as exc:
            self.metrics.feedback_rejected.labels(exc.code or "invalid_request").inc()
            raise

    async def _submit(self, body: dict[str, Any], header_key: str | None, principal: Principal | None) -> Submitted:
        request = convert(body, FeedbackRequest, invalid=Unprocessable)
        user = acting_user(principal, request.user)
        key = _idempotency_key(request.idempotency_key, header_key)
        kind = self.kinds.get(request.kind)
        if kind is None:
            raise Unprocessable(f"Unknown feedback kind {request.kind!r}; this server accepts "
                                f"{', '.join(sorted(self.kinds))}.", param="kind", code="unknown_kind")
        if unknown := sorted(body.keys() - FEEDBACK_COMMON_FIELDS - kind.fields):
            raise Unprocessable(f"Unknown field {unknown[0]!r} for feedback kind {kind.name!r} (its own fields: "
                                f"{', '.join(sorted(kind.fields)) or 'none'}).", param=unknown[0],
                                code="unknown_field")
        payload = convert({k: v for k, v in body.items() if k in kind.fields}, kind.payload, invalid=InvalidFeedback)
        request_hash = _request_hash(body)
        if principal is not None and not principal.is_admin:  # before a replay, which would tell another's event
            owner = (await self._completion(request.completion_id)).principal
            check_may_judge(principal, request.completion_id, owner)
        if key is not None and (replay := await self._replay(key, request_hash, principal)) is not None:
            return replay
        async with self._serialized(request.completion_id, kind):
            completion, history = await self._context(request.completion_id, kind)
            feedback = Feedback(id=f"fb-{uuid.uuid4().hex}", completion_id=completion.id, kind=kind.name,
                                payload=payload, user=user or completion.user, comment=request.comment,
                                tags=list(request.tags), idempotency_key=key, created=datetime.now(UTC),
                                history=history, principal=principal.name if principal is not None else None)
            signal, rejection = await self.calls.run(
                lambda trace: self._judge(trace, kind, feedback, completion))
            if rejection is not None:
                raise _rejected(rejection)
            record = _record(feedback, completion, signal, request_hash)
            try:
                await self.store.record_feedback(record)
            except RecordRejectedError:
                # The same key committed meanwhile (a concurrent retry): answer like a retry would be answered.
                if key is not None and (replay := await self._replay(key, request_hash, principal)) is not None:
                    return replay
                # Or the completion was deleted (retention, a user's deletion; maybe by another replica) after it
                # was read or cached.
                if (await self.store.feedback_context(completion.id))[0] is None:
                    self.forget_cached()
                    raise NotFound(f"No completion with id {completion.id!r}.", param="completion_id") from None
                raise
            if kind.uses_history:
                self._remember(completion.id, kind, feedback)
        self.metrics.feedback_events.labels(kind.name).inc()
        if signal.pairs:
            self.metrics.feedback_pairs.labels(kind.name).inc(len(signal.pairs))
        if signal.labels:
            self.metrics.feedback_labels.labels(kind.name).inc(len(signal.labels))
        self.sinks.dispatch(feedback=feedback, completion=completion, signal=signal, context=self.context)
        return Submitted(FeedbackCreated(id=feedback.id, completion_id=completion.id, kind=kind.name,
                                         created=iso(feedback.created), pairs=len(signal.pairs),
                                         labels=len(signal.labels)), replayed=False)

    def _judge(self, trace: CallTrace, kind: FeedbackKind, feedback: Feedback,
               completion: CompletionRecord) -> tuple[Signal, Rejection | None]:
        """In a plugin thread: ``prepare_feedback``, the converter, ``filter_feedback`` (implementations looked up
        per event: plugins registered at run time count). A raising call does not stop the hook's other
        implementations; the event is then refused."""
        for impl in hook_impls(self.pm.hook.prepare_feedback):
            trace.call(impl.plugin_name, "prepare_feedback", call_impl, impl, feedback=feedback, completion=completion)
        trace.check()
        signal = trace.call(kind.plugin, f"the converter of kind {kind.name!r}", kind.convert, feedback, completion)
        trace.check()
        if not isinstance(signal, Signal):
            raise PluginFailed(f"The feedback was not stored: the converter of kind {kind.name!r} (plugin "
                               f"{kind.plugin!r}) returned {type(signal).__name__}, not a Signal.")
        rejection = None
        for impl in hook_impls(self.pm.hook.filter_feedback):  # firstresult: the first rejection wins
            rejection = trace.call(impl.plugin_name, "filter_feedback", call_impl, impl, feedback=feedback,
                                   completion=completion, context=self.context)
            if rejection is not None:
                break
        trace.check()
        return signal, rejection

    async def _replay(self, key: str, request_hash: str, principal: Principal | None) -> Submitted | None:
        stored = await self.store.feedback_by_key(key)
        if stored is None:
            return None
        if principal is not None and not principal.is_admin and stored.principal != principal.name:
            # Keys are unique across callers; another principal's event under it is not this caller's to see.
            raise Conflict(f"Idempotency key {key!r} was already used by another caller.", param="idempotency_key",
                           code="idempotency_key_reused")
        if stored.request_hash != request_hash:
            raise Conflict(f"Idempotency key {key!r} was already used for a different feedback request "
                           f"({stored.id}).", param="idempotency_key", code="idempotency_key_reused")
        return Submitted(FeedbackCreated(id=stored.id, completion_id=stored.completion_id, kind=stored.kind,
                                         created=iso(stored.created), pairs=stored.pair_count,
                                         labels=stored.label_count), replayed=True)

    async def _completion(self, completion_id: str) -> CompletionRecord:
        """The completion (404 if unknown), from memory when possible."""
        completion = self._completions.get(completion_id)
        if completion is not None:
            self._completions.move_to_end(completion_id)
            return completion
        read, _ = await self.store.feedback_context(completion_id)
        if read is None:
            raise NotFound(f"No completion with id {completion_id!r}.", param="completion_id")
        self._cache_completion(read)
        return read

    def _cache_completion(self, completion: CompletionRecord) -> None:
        self._completions[completion.id] = completion
        if len(self._completions) > _COMPLETION_CACHE_SIZE:
            self._completions.popitem(last=False)

    async def _context(self, completion_id: str, kind: FeedbackKind) -> tuple[CompletionRecord, list[Feedback]]:
        """The completion (404 if unknown) and, for kinds that use it, the history: from memory when possible, else
        in one read. The caller holds the completion's lock for kinds with history."""
        completion = self._completions.get(completion_id)
        key = (completion_id, kind.name)
        cached = self._histories.get(key) if self._histories is not None and kind.uses_history else None
        if completion is not None and (cached is not None or not kind.uses_history):
            self._completions.move_to_end(completion_id)
            return completion, list(cached or [])
        read, stored = await self.store.feedback_context(
            completion_id, completion=completion is None,
            history_kind=kind.name if kind.uses_history and cached is None else None)
        if completion is None:
            if read is None:
                raise NotFound(f"No completion with id {completion_id!r}.", param="completion_id")
            completion = read
            self._cache_completion(read)
        if not kind.uses_history:
            return completion, []
        if cached is None:
            cached = self._as_feedback(stored, kind)
            if self._histories is not None:
                self._histories[key] = cached
                if len(self._histories) > _HISTORY_CACHE_SIZE:
                    self._histories.popitem(last=False)
        return completion, list(cached)

    def _remember(self, completion_id: str, kind: FeedbackKind, feedback: Feedback) -> None:
        """Append a just-committed event to its cached history."""
        if self._histories is not None and (cached := self._histories.get((completion_id, kind.name))) is not None:
            cached.append(msgspec.structs.replace(feedback, history=[]))

    @staticmethod
    def _as_feedback(stored: list[StoredFeedback], kind: FeedbackKind) -> list[Feedback]:
        history = []
        for event in stored:
            try:
                payload = msgspec.convert(event.payload, kind.payload)
            except msgspec.ValidationError:  # stored under an older payload schema: not comparable
                log.warning("feedback %s no longer matches kind %s's payload; left out of its history",
                            event.id, kind.name)
                continue
            history.append(Feedback(id=event.id, completion_id=event.completion_id, kind=event.kind,
                                    payload=payload, user=event.user, comment=event.comment, tags=event.tags,
                                    idempotency_key=event.idempotency_key, created=event.created,
                                    principal=event.principal))
        return history

    @asynccontextmanager
    async def _serialized(self, completion_id: str, kind: FeedbackKind) -> AsyncIterator[None]:
        """For kinds that read earlier feedback: one event per completion at a time (in this process), so that two
        concurrent events each see the other (e.g. an up and a down on different choices make a pair)."""
        if not kind.uses_history:
            yield
            return
        lock, users = self._locks.get(completion_id, (asyncio.Lock(), 0))
        self._locks[completion_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[completion_id]
            if users == 1:
                del self._locks[completion_id]
            else:
                self._locks[completion_id] = (lock, users - 1)

    # --- reading ---------------------------------------------------------------------------------------------

    async def list_feedback(self, query: FeedbackQuery) -> FeedbackList:
        """One page of stored events, oldest first."""
        rows = await self.store.list_feedback(completion_id=query.completion_id, kind=query.kind, user=query.user,
                                              since=_aware(query.since), after=query.after, limit=query.limit + 1)
        page = rows[: query.limit]
        data = await self._events(page)
        return FeedbackList(data=data, has_more=len(rows) > query.limit, first_id=page[0].id if page else None,
                            last_id=page[-1].id if page else None)

    async def stats(self, query: FeedbackStatsQuery) -> FeedbackStats:
        """Feedback volume by kind per hour or day, from ``query.since`` (rounded down to its bucket) or a default
        window (48 hours by hour, 30 days by day)."""
        since = _aware(query.since) or datetime.now(UTC) - _STATS_WINDOW[query.bucket]
        since = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        if query.bucket == "day":
            since = since.replace(hour=0)
        buckets: dict[datetime, dict[str, int]] = {}
        totals: dict[str, int] = {}
        for start, kind, events in await self.store.feedback_volume(bucket=query.bucket, since=since):
            buckets.setdefault(start, {})[kind] = events
            totals[kind] = totals.get(kind, 0) + events
        return FeedbackStats(bucket=query.bucket, since=iso(since), kinds=sorted(totals), totals=totals,
                             data=[FeedbackBucket(start=iso(start), counts=counts, total=sum(counts.values()))
                                   for start, counts in sorted(buckets.items())])

    async def export(self, query: ExportQuery) -> AsyncIterator[bytes]:
        """JSONL in the requested format, a page of lines at a time (memory stays constant). The first page is read
        before this returns: a database that fails at once is an error response (503), not a 200 cut short."""
        pages = self._export_pages(query)
        first = await anext(pages, None)

        async def all_pages() -> AsyncIterator[bytes]:
            if first is not None:
                yield first
            async for page in pages:
                yield page

        return all_pages()

    async def _export_pages(self, query: ExportQuery) -> AsyncIterator[bytes]:
        encoder = msgspec.json.Encoder()
        since = _aware(query.since)
        lines: AsyncIterator[Iterable[msgspec.Struct]]
        if query.format == "preferences":
            lines = self._preference_lines(since, query.policy)
        elif query.format == "kto":
            lines = self._kto_lines(since, query.policy)
        else:
            lines = self._event_lines(since, query.policy)
        async for page in lines:
            yield b"".join(encoder.encode(line) + b"\n" for line in page)

    async def _preference_lines(self, since: datetime | None, policy: int | None) -> AsyncIterator[list[Any]]:
        r = self.redactor
        async for pairs in self.store.iter_pairs(since=since, policy_version=policy, page=_EXPORT_PAGE):
            yield [PreferenceLine(prompt=r.messages(p.prompt), chosen=assistant(r.text(p.chosen)),
                                  rejected=assistant(r.text(p.rejected)),
                                  margin=p.margin, weight=p.weight, completion_id=p.completion_id,
                                  feedback_id=p.feedback_id, kind=p.kind, policy_version=p.policy_version,
                                  chosen_choice=p.chosen_choice, rejected_choice=p.rejected_choice,
                                  created=iso(p.created)) for p in pairs]

    async def _kto_lines(self, since: datetime | None, policy: int | None) -> AsyncIterator[list[Any]]:
        r = self.redactor
        async for labels in self.store.iter_labels(since=since, policy_version=policy, page=_EXPORT_PAGE):
            yield [KTOLine(prompt=r.messages(lb.prompt), completion=assistant(r.text(lb.reply)), label=lb.good,
                           weight=lb.weight, completion_id=lb.completion_id, feedback_id=lb.feedback_id,
                           kind=lb.kind, policy_version=lb.policy_version, choice=lb.choice, created=iso(lb.created))
                   for lb in labels]

    async def _event_lines(self, since: datetime | None, policy: int | None) -> AsyncIterator[list[Any]]:
        async for rows in self.store.iter_feedback(since=since, policy_version=policy, page=_EXPORT_PAGE):
            yield await self._events(rows)

    async def _events(self, rows: list[StoredFeedback]) -> list[FeedbackEvent]:
        """Self-contained event lines (prompt and choices included), redacted: they leave the server."""
        context = await self.store.prompts_and_choices([r.completion_id for r in rows]) if rows else {}
        events = []
        for r in rows:
            messages, texts = context.get(r.completion_id, ([], []))
            events.append(FeedbackEvent(
                id=r.id, created=iso(r.created), completion_id=r.completion_id, kind=r.kind, choice=r.choice,
                policy_version=r.policy_version, payload=r.payload, user=r.user, comment=r.comment, tags=r.tags,
                pairs=r.pair_count, labels=r.label_count, prompt=plain_messages(messages), choices=texts,
                principal=r.principal))
        return [self.redactor.event(event) for event in events]


def _record(feedback: Feedback, completion: CompletionRecord, signal: Signal, request_hash: str) -> FeedbackRecord:
    return FeedbackRecord(
        id=feedback.id, completion_id=completion.id, kind=feedback.kind, choice=payload_choice(feedback.payload),
        payload=msgspec.to_builtins(feedback.payload), user=feedback.user, comment=feedback.comment,
        tags=feedback.tags, idempotency_key=feedback.idempotency_key, request_hash=request_hash,
        policy_version=completion.policy_version, created=feedback.created,
        pairs=signal.pairs, labels=signal.labels, principal=feedback.principal)


def _idempotency_key(body_key: str | None, header_key: str | None) -> str | None:
    if header_key is not None:
        if not 1 <= len(header_key) <= 256:
            raise Unprocessable("The Idempotency-Key header must be 1 to 256 characters.", param="idempotency_key")
        if body_key is not None and body_key != header_key:
            raise Unprocessable("The Idempotency-Key header and the idempotency_key field differ.",
                                param="idempotency_key")
    return body_key or header_key


def _request_hash(body: dict[str, Any]) -> str:
    """The body without its idempotency key, canonically encoded and hashed: equal for a faithful retry."""
    canonical = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).hexdigest()


def _rejected(rejection: Rejection) -> AlignError:
    if rejection.status == 429:
        headers = {"Retry-After": str(max(1, round(rejection.retry_after)))} if rejection.retry_after else None
        return RateLimited(rejection.reason, code=rejection.code, headers=headers)
    return Unprocessable(rejection.reason, param=rejection.param, code=rejection.code)


def _aware(moment: datetime | None) -> datetime | None:
    """Query timestamps without a timezone are UTC."""
    if moment is not None and (moment.tzinfo is None or moment.utcoffset() is None):
        return moment.replace(tzinfo=UTC)
    return moment
