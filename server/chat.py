"""The chat service: validate a request against the running model, generate, store, and shape OpenAI responses.

Every completion is committed to the store before the response's last byte (for a stream: before ``[DONE]``). When
the database fails, the answer is a 503 (a stream, already under way, ends with an error event instead of ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import msgspec

from alignd.engine.types import ChoiceDelta, GenerationStep
from alignd.errors import AlignError, DatabaseUnavailable, InvalidRequest
from alignd.messages import plain_messages
from alignd.metrics import Metrics
from alignd.policies.router import PolicyRouter
from alignd.principals import Principal, acting_user
from alignd.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    SamplingOptions,
    Usage,
    fingerprint,
)
from alignd.store import ChoiceRecord, CompletionRecord, Store
from alignd.store.faults import outage

log = logging.getLogger(__name__)


class ChatEngine(Protocol):
    """What the chat service needs of an engine (``VLLMEngine`` is the real one)."""

    max_model_len: int

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...

    def generate(self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str,
                 policy_version: int = 0, *, stream: bool = False) -> AsyncIterator[GenerationStep]: ...


@dataclass
class PreparedChat:
    """A validated request, ready for the engine."""

    request: ChatCompletionRequest
    completion_id: str
    policy_version: int
    prompt_token_ids: list[int]
    options: SamplingOptions
    user: str | None = None
    """The end user it is for (see :func:`alignd.principals.acting_user`)."""
    principal: str | None = None
    """The name of the principal whose key asked (None: no key)."""
    choice_versions: list[int] | None = None
    """A blind side-by-side: the policy version of each choice (the canary's and the promoted one's, in random
    order); None when one version writes every choice."""
    started: float = field(default_factory=time.perf_counter)
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def fingerprint(self) -> str:
        """The ``system_fingerprint``: the version that wrote the choices; a side-by-side names both, in version order
        (which choice is whose stays hidden: the comparison is blind)."""
        if self.choice_versions:
            return "+".join(fingerprint(v) for v in sorted(set(self.choice_versions)))
        return fingerprint(self.policy_version)


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class ChatService:
    """Turns chat requests into engine calls, stored completions and OpenAI-shaped responses."""

    def __init__(self, engine: ChatEngine, router: PolicyRouter, store: Store, metrics: Metrics, *,
                 max_n: int = 16) -> None:
        self.engine = engine
        self.router = router
        self.store = store
        self.metrics = metrics
        self.max_n = max_n

    # --- validation ------------------------------------------------------------------------------------------

    def prepare(self, request: ChatCompletionRequest, principal: Principal | None = None) -> PreparedChat:
        """Check who may ask for what (``user``) and what depends on the running server (model, n cap, context
        left); nothing reaches the engine yet. ``principal`` is the caller (None: no key)."""
        user = acting_user(principal, request.user)
        # The canary's share is drawn per user (the end user, else the key's principal): sticky for the experiment.
        version = self.router.resolve(request.model, user or (principal.name if principal is not None else None))
        pair = self.router.side_by_side(request.model) if request.n > 1 else None
        choice_versions = None
        if pair is not None:  # a blind side-by-side: half the choices each, in an order the client cannot know
            version, choice_versions = pair[1], [pair[i % 2] for i in range(request.n)]
            random.shuffle(choice_versions)
        if unsupported := request.unsupported_field():
            raise InvalidRequest(f"'{unsupported}' is not supported by this server.", param=unsupported,
                                 code="unsupported_parameter")
        if request.n > self.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.max_n}, got {request.n}.", param="n")
        if request.n > 1 and request.temperature == 0:
            raise InvalidRequest("n > 1 needs temperature > 0: greedy decoding gives n identical choices.",
                                 param="temperature")
        prompt = self.engine.render_prompt(plain_messages({"role": m.role, "content": m.text()}
                                                          for m in request.messages))
        context_left = self.engine.max_model_len - len(prompt)
        if context_left < 1:
            raise InvalidRequest(
                f"The messages take {len(prompt)} tokens; this model's context is {self.engine.max_model_len}.",
                param="messages", code="context_length_exceeded")
        asked = request.requested_max_tokens
        if asked is not None and asked > context_left:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise InvalidRequest(
                f"{param} is {asked}, but only {context_left} tokens of context are left after the "
                f"{len(prompt)}-token prompt (context {self.engine.max_model_len}).",
                param=param, code="context_length_exceeded")
        if request.min_tokens and request.min_tokens > (asked or context_left):
            raise InvalidRequest(f"min_tokens is {request.min_tokens}, more than the {asked or context_left} tokens "
                                 "that may be generated.", param="min_tokens")
        return PreparedChat(request=request, completion_id=f"chatcmpl-{uuid.uuid4().hex}", policy_version=version,
                            prompt_token_ids=prompt, options=request.to_sampling(asked or context_left), user=user,
                            principal=principal.name if principal is not None else None,
                            choice_versions=choice_versions)

    # --- generation ------------------------------------------------------------------------------------------

    async def complete(self, chat: PreparedChat) -> ChatCompletion:
        """Generate every choice, store the completion, return the response."""
        states = [_ChoiceState() for _ in range(chat.request.n)]
        try:
            async for step in self._generate(chat, stream=False):
                self._accumulate(states, step)
        except asyncio.CancelledError:
            self._store_in_background(chat, states, aborted=True)
            raise
        await self._store(chat, states)
        usage = self._usage(chat, states)
        return ChatCompletion(
            id=chat.completion_id,
            created=int(chat.created.timestamp()),
            model=chat.request.model,
            system_fingerprint=chat.fingerprint(),
            choices=[Choice(index=i, message=AssistantMessage(content="".join(s.text)), finish_reason=s.finish_reason)
                     for i, s in enumerate(states)],
            usage=usage,
        )

    async def stream(self, chat: PreparedChat) -> AsyncIterator[bytes]:
        """Server-sent events: a role chunk per choice, content deltas, finish reasons, optional usage, [DONE]."""
        states = [_ChoiceState() for _ in range(chat.request.n)]
        base = {"id": chat.completion_id, "created": int(chat.created.timestamp()), "model": chat.request.model,
                "system_fingerprint": chat.fingerprint()}
        include_usage = bool(chat.request.stream_options and chat.request.stream_options.include_usage)
        completed = False
        try:
            yield _sse(ChatCompletionChunk(**base, choices=[
                ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(chat.request.n)]))
            async for step in self._generate(chat, stream=True):
                self._accumulate(states, step)
                choices = [ChunkChoice(index=c.index, delta=Delta(content=c.text or None),
                                       finish_reason=c.finish_reason)
                           for c in step.choices if c.text or c.finish_reason]
                if choices:
                    yield _sse(ChatCompletionChunk(**base, choices=choices))
            try:
                await self._store(chat, states)
            except Exception as exc:
                if (reason := outage(exc)) is None:
                    raise
                # The 200 and the text are sent: say it failed the way OpenAI's streams do (an error event, no
                # [DONE]). Nothing is stored in the background either: that write would meet the same database.
                completed = True
                self.metrics.database_errors.labels(reason).inc()
                yield _sse_error(DatabaseUnavailable.of(reason))
                return
            completed = True
            if include_usage:
                yield _sse(ChatCompletionChunk(**base, choices=[], usage=self._usage(chat, states)))
            yield b"data: [DONE]\n\n"
        finally:
            if not completed:
                self._store_in_background(chat, states, aborted=True)

    async def _generate(self, chat: PreparedChat, *, stream: bool) -> AsyncIterator[GenerationStep]:
        first = True
        self.metrics.engine_requests.inc()
        agen = (self.engine.generate(chat.prompt_token_ids, chat.options, chat.completion_id, chat.policy_version,
                                     stream=stream)
                if chat.choice_versions is None else _side_by_side(self.engine, chat, stream))
        try:
            async for step in agen:
                if first and any(c.token_ids for c in step.choices):
                    first = False
                    self.metrics.time_to_first_token.observe(time.perf_counter() - chat.started)
                yield step
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.client_disconnects.inc()
            raise
        except Exception:  # the engine failed this version's request: its error rate (a canary's live test)
            self._outcome(chat, ok=False)
            raise
        finally:
            await agen.aclose()
        self._outcome(chat, ok=True)

    def _outcome(self, chat: PreparedChat, *, ok: bool) -> None:
        for version in sorted(set(chat.choice_versions or [chat.policy_version])):
            self.router.tally.record(version, ok)
            self.metrics.version_requests.labels(str(version), "ok" if ok else "error").inc()

    @staticmethod
    def _accumulate(states: list[_ChoiceState], step: GenerationStep) -> None:
        for c in step.choices:
            s = states[c.index]
            s.text.append(c.text)
            s.token_ids.extend(c.token_ids)
            s.finish_reason = c.finish_reason or s.finish_reason

    def _usage(self, chat: PreparedChat, states: list[_ChoiceState]) -> Usage:
        completion = sum(len(s.token_ids) for s in states)
        return Usage(prompt_tokens=len(chat.prompt_token_ids), completion_tokens=completion,
                     total_tokens=len(chat.prompt_token_ids) + completion)

    # --- storage ---------------------------------------------------------------------------------------------

    def _record(self, chat: PreparedChat, states: list[_ChoiceState], aborted: bool) -> CompletionRecord:
        req = chat.request
        return CompletionRecord(
            id=chat.completion_id,
            created=chat.created,
            model=req.model,
            policy_version=chat.policy_version,
            messages=[msgspec.to_builtins(m) for m in req.messages],
            params={**msgspec.to_builtins(req.params_record()),
                    **({"side_by_side": chat.choice_versions} if chat.choice_versions else {})},
            user=chat.user,
            metadata=req.metadata,
            prompt_tokens=len(chat.prompt_token_ids),
            completion_tokens=sum(len(s.token_ids) for s in states),
            latency_ms=(time.perf_counter() - chat.started) * 1000.0,
            stream=req.stream,
            choices=[ChoiceRecord(index=i, text="".join(s.text), token_ids=s.token_ids,
                                  finish_reason=s.finish_reason or ("abort" if aborted else None))
                     for i, s in enumerate(states)],
            principal=chat.principal,
        )

    async def _store(self, chat: PreparedChat, states: list[_ChoiceState]) -> None:
        record = self._record(chat, states, aborted=False)
        try:
            await self.store.record_completion(record)
        except Exception:
            self.metrics.store_errors.inc()
            raise
        self.metrics.completions_stored.inc()
        self.metrics.prompt_tokens.inc(record.prompt_tokens)
        self.metrics.completion_tokens.inc(record.completion_tokens)

    def _store_in_background(self, chat: PreparedChat, states: list[_ChoiceState], aborted: bool) -> None:
        # The client is gone; keep what was generated (finish_reason "abort") without holding anyone up.
        record = self._record(chat, states, aborted=aborted)

        async def store() -> None:
            try:
                await self.store.record_completion(record)
            except Exception:
                self.metrics.store_errors.inc()
                log.exception("could not store aborted completion %s", record.id)

        task = asyncio.get_running_loop().create_task(store())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


def _sse(chunk: ChatCompletionChunk) -> bytes:
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


def _sse_error(error: AlignError) -> bytes:
    body = ErrorResponse(error=ErrorDetail(message=error.message, type=error.type, param=error.param,
                                           code=error.code))
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


async def _side_by_side(engine: ChatEngine, chat: PreparedChat, stream: bool) -> AsyncIterator[GenerationStep]:
    """The steps of a blind side-by-side as one request's: each version generates its choices (one engine request
    each, ``n`` of them) and their indices are mapped to the positions ``chat.choice_versions`` gave them."""
    positions: dict[int, list[int]] = {}
    for position, version in enumerate(chat.choice_versions or []):
        positions.setdefault(version, []).append(position)
    queue: asyncio.Queue[list[ChoiceDelta] | BaseException | None] = asyncio.Queue()

    async def pump(version: int, where: list[int], suffix: int) -> None:
        options = msgspec.structs.replace(chat.options, n=len(where))
        agen = engine.generate(chat.prompt_token_ids, options, f"{chat.completion_id}-{suffix}", version,
                               stream=stream)
        try:
            async for step in agen:
                await queue.put([ChoiceDelta(index=where[c.index], text=c.text, token_ids=c.token_ids,
                                             finish_reason=c.finish_reason) for c in step.choices])
            await queue.put(None)
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await agen.aclose()

    tasks = [asyncio.ensure_future(pump(v, where, i)) for i, (v, where) in enumerate(sorted(positions.items()))]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield GenerationStep(choices=item, finished=False)
        yield GenerationStep(choices=[], finished=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
