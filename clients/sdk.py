"""Python SDK for alignd: chat, feedback, export, and the operator endpoints (policies, training runs, API keys,
per-user deletion and retention).

Import it as ``from alignd.clients import Client, AsyncClient, AligndError``::

    from alignd.clients import Client

    with Client("http://127.0.0.1:8000", api_key="my-key") as client:
        reply = client.chat([{"role": "user", "content": "How do I keep basil alive?"}], n=2, temperature=1.0)
        print(reply.system_fingerprint, [c.message.content for c in reply.choices])
        client.feedback.pairwise(reply.id, winner=1)
        for chunk in client.chat([{"role": "user", "content": "Hi!"}], stream=True):
            print("".join(c.delta.content or "" for c in chunk.choices), end="")

Answers are the msgspec Structs of :mod:`alignd.protocol` (light: no torch or vLLM is imported). Connection errors,
429 and 503 are retried with exponential backoff and jitter (``Retry-After`` wins when the server sends it); every
feedback POST carries an idempotency key, so a retry cannot count twice. Failures raise :class:`AligndError`
subclasses carrying the server's OpenAI-shaped error (``status``, ``code``, ``param``, ``message``).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, TypeVar, Unpack, overload
from urllib.parse import quote

import httpx
import msgspec

from alignd.protocol import (
    ApiKey,
    ApiKeyCreated,
    ApiKeyList,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ErrorResponse,
    FeedbackCreated,
    Policy,
    PolicyEvaluation,
    PolicyList,
    PrincipalRole,
    RetentionRun,
    TrainingRun,
    TrainingRunList,
    TrustState,
    UserData,
    UserDeletion,
    UserTrust,
    UserTrustList,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AligndError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "FeedbackOptions",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "Stream",
    "UnavailableError",
    "UnprocessableEntityError",
]

T = TypeVar("T")
Message = ChatMessage | Mapping[str, Any]
Winner = int | Literal["tie", "both_bad"]


class FeedbackOptions(TypedDict, total=False):
    """Fields every feedback kind accepts."""

    comment: str | None
    tags: Sequence[str] | None
    user: str | None
    idempotency_key: str | None
    """Sent as given; when None the SDK generates one per call, so that its retries replay instead of repeat."""

DEFAULT_URL = "http://127.0.0.1:8000"
_RETRY_STATUSES = frozenset({429, 503})
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 8.0
_RETRY_AFTER_MAX_S = 60.0  # a server asking for longer than this is better reported than waited for
# Failures that guarantee the request never reached the server, so even a non-idempotent POST may be resent.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


# --- errors --------------------------------------------------------------------------------------------------------


class AligndError(Exception):
    """Base of every error the SDK raises."""


class APIConnectionError(AligndError):
    """The server could not be reached, or the connection broke before the answer was complete."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the client's timeout."""


class APIError(AligndError):
    """The server answered with an error status; fields come from its ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {message}" + (f" (param: {param})" if param else ""))
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


class BadRequestError(APIError):
    """400: a malformed request (bad JSON, unsupported field, context too long, ...)."""


class AuthenticationError(APIError):
    """401: missing or invalid key."""


class PermissionDeniedError(APIError):
    """403: the key may not do this: an operator endpoint without an admin key (or none configured), feedback on
    another principal's completion, a user key naming another user."""


class NotFoundError(APIError):
    """404: unknown completion, policy, run, model, or an endpoint this server does not have."""


class ConflictError(APIError):
    """409: an idempotency key reused with another body, a training run already in progress, ..."""


class UnprocessableEntityError(APIError):
    """422: a payload the server understood but refused; ``param`` names the field."""


class RateLimitError(APIError):
    """429: rate limited (raised once the retries are spent)."""


class UnavailableError(APIError):
    """503: the server cannot serve now, e.g. the model is still loading (raised once the retries are spent)."""


class InternalServerError(APIError):
    """5xx other than 503."""


_ERRORS: dict[int, type[APIError]] = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
                                      404: NotFoundError, 409: ConflictError, 422: UnprocessableEntityError,
                                      429: RateLimitError, 503: UnavailableError}


def _api_error(status: int, body: bytes, headers: Mapping[str, str]) -> APIError:
    """The typed error for an error response, reading OpenAI's error shape when the body has it."""
    cls = _ERRORS.get(status, InternalServerError if status >= 500 else APIError)
    try:
        detail = msgspec.json.decode(body, type=ErrorResponse).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body.decode(errors="replace").strip()
        return cls(status, text[:500] or httpx.codes.get_reason_phrase(status), headers=headers)
    return cls(status, detail.message, type=detail.type, param=detail.param, code=detail.code, headers=headers)


def _connection_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"Timed out talking to {url}: {type(exc).__name__}")
    return APIConnectionError(f"Could not talk to {url}: {exc or type(exc).__name__}")


# --- retry policy --------------------------------------------------------------------------------------------------


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait a ``Retry-After`` header asks for (seconds or an HTTP date), if it is there and readable."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def backoff_s(attempt: int, headers: Mapping[str, str] | None, rng: random.Random) -> float:
    """How long to wait before retry number ``attempt`` (0-based): the server's ``Retry-After`` when given,
    else exponential backoff with jitter (so that many clients failing together do not retry together)."""
    if headers is not None and (asked := retry_after_s(headers)) is not None:
        return min(asked, _RETRY_AFTER_MAX_S)
    delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt)
    return delay * rng.uniform(0.5, 1.0)


# --- request bodies (shared by the sync and async clients) ---------------------------------------------------------


def _chat_body(messages: Sequence[Message], model: str, n: int, temperature: float | None, max_tokens: int | None,
               stream: bool, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": list(messages), "n": n, "stream": stream}
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def _feedback_body(completion_id: str, kind: str, fields: dict[str, Any], comment: str | None,
                   tags: Sequence[str] | None, user: str | None, idempotency_key: str | None) -> dict[str, Any]:
    # A key for every submission, generated when the caller gave none: a retried POST then replays the first
    # answer instead of storing the feedback twice.
    body = {"completion_id": completion_id, "kind": kind, **{k: v for k, v in fields.items() if v is not None},
            "idempotency_key": idempotency_key or f"sdk-{uuid.uuid4().hex}"}
    if comment is not None:
        body["comment"] = comment
    if tags:
        body["tags"] = list(tags)
    if user is not None:
        body["user"] = user
    return body


def _export_params(format: str, since: datetime | str | None, policy: int | None) -> dict[str, str]:
    params = {"format": format}
    if since is not None:
        params["since"] = since.isoformat() if isinstance(since, datetime) else since
    if policy is not None:
        params["policy"] = str(policy)
    return params


def _training_body(iterations: int | None, rollout_batch_size: int | None, time_limit_s: float | None,
                   promote: bool, objective: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"promote": promote}
    for name, value in (("iterations", iterations), ("rollout_batch_size", rollout_batch_size),
                        ("time_limit_s", time_limit_s), ("objective", objective)):
        if value is not None:
            body[name] = value
    return body


def _user_path(user: str) -> str:
    """The path of an end user's operator endpoint: the id percent-encoded, "/" included."""
    return "/v1/admin/users/" + quote(user, safe="")


def _principal_params(principal: str | None) -> dict[str, str] | None:
    return None if principal is None else {"principal": principal}


def _user_list_params(flagged: bool | None, trust: TrustState | None, limit: int | None) -> dict[str, str]:
    params = {"flagged": None if flagged is None else str(flagged).lower(), "trust": trust,
              "limit": None if limit is None else str(limit)}
    return {name: value for name, value in params.items() if value is not None}


def _trust_body(trust: TrustState, note: str | None) -> dict[str, str]:
    return {"trust": trust} if note is None else {"trust": trust, "note": note}


def _retention_body(older_than_days: int | None) -> dict[str, int] | None:
    return None if older_than_days is None else {"older_than_days": older_than_days}


def _decode(content: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(content, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise AligndError(f"Unexpected answer from the server (expected {type_.__name__}): {e}") from e


def _sse_chunk(line: str) -> ChatCompletionChunk | Literal["done"] | None:
    """One line of a chat stream: a chunk, ``"done"`` at ``[DONE]``, or None for blank lines and comments."""
    if not line.startswith("data:"):
        return None  # blank separators, ``:`` comments, event/id fields
    data = line[5:].strip()
    if data == "[DONE]":
        return "done"
    return _decode(data.encode(), ChatCompletionChunk)


class _Base:
    """Settings and request preparation shared by :class:`Client` and :class:`AsyncClient`."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float | httpx.Timeout, max_retries: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self._rng = random.Random()
        self._headers = {"accept": "application/json", "user-agent": "alignd-sdk"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, body: Any, params: Mapping[str, str] | None) -> httpx.Request:
        content = None if body is None else msgspec.json.encode(body)
        headers = self._headers if content is None else {**self._headers, "content-type": "application/json"}
        return httpx.Request(method, self.base_url + path, content=content, params=params, headers=headers)

    def _should_retry(self, attempt: int, *, status: int | None = None, error: httpx.TransportError | None = None,
                      idempotent: bool = False) -> bool:
        """Retry 429 and 503 (the server did nothing), and connection failures; a failure after the request may
        have reached the server (read error, read timeout) only for requests that are safe to repeat."""
        if attempt >= self.max_retries:
            return False
        if error is not None:
            return idempotent or isinstance(error, _NOT_SENT)
        return status in _RETRY_STATUSES


# --- sync ----------------------------------------------------------------------------------------------------------


class Stream(Iterator[ChatCompletionChunk]):
    """The chunks of a streaming chat answer; close it (or use ``with``) to stop early and free the connection."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.response = response
        self._lines = response.iter_lines()
        self._url = url
        self._done = False

    def __next__(self) -> ChatCompletionChunk:
        while not self._done:
            try:
                line = next(self._lines)
            except StopIteration:
                self.close()
                raise APIConnectionError(f"The stream from {self._url} ended before [DONE].") from None
            except httpx.TransportError as e:
                self.close()
                raise _connection_error(e, self._url) from e
            chunk = _sse_chunk(line)
            if chunk == "done":
                self.close()
            elif chunk is not None:
                return chunk
        raise StopIteration

    def close(self) -> None:
        self._done = True
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Client(_Base):
    """Synchronous client. ``api_key`` is sent as ``Authorization: Bearer <key>``; an admin key also works for the
    chat and feedback endpoints, and is needed for :attr:`policies`, :attr:`training`, :attr:`keys`,
    :attr:`users`, :attr:`retention` and :meth:`export`."""

    _sleep = staticmethod(time.sleep)  # the wait between retries (tests record it instead)

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float | httpx.Timeout = 60,
                 max_retries: int = 3, *, http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = http_client or httpx.Client(timeout=timeout)
        self.feedback = Feedback(self)
        self.policies = Policies(self)
        self.training = Training(self)
        self.keys = Keys(self)
        self.users = Users(self)
        self.retention = Retention(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None, *,
              stream: bool = False, idempotent: bool | None = None) -> httpx.Response:
        """Send with retries; return a successful response (open, for ``stream``) or raise the typed error."""
        request = self._request(method, path, body, params)
        idempotent = method == "GET" if idempotent is None else idempotent
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if not self._should_retry(attempt, error=e, idempotent=idempotent):
                    raise _connection_error(e, self.base_url) from e
                self._sleep(backoff_s(attempt, None, self._rng))
            else:
                if response.is_success:
                    return response
                content = response.read()
                response.close()
                if not self._should_retry(attempt, status=response.status_code):
                    raise _api_error(response.status_code, content, response.headers)
                self._sleep(backoff_s(attempt, response.headers, self._rng))
            attempt += 1

    def _call(self, method: str, path: str, type_: type[T], body: Any = None,
              params: Mapping[str, str] | None = None, *, idempotent: bool | None = None) -> T:
        return _decode(self._send(method, path, body, params, idempotent=idempotent).content, type_)

    @overload
    def chat(self, messages: Sequence[Message], *, model: str = ..., n: int = ..., temperature: float | None = ...,
             max_tokens: int | None = ..., stream: Literal[False] = ..., **extra: Any) -> ChatCompletion: ...

    @overload
    def chat(self, messages: Sequence[Message], *, model: str = ..., n: int = ..., temperature: float | None = ...,
             max_tokens: int | None = ..., stream: Literal[True], **extra: Any) -> Stream: ...

    @overload
    def chat(self, messages: Sequence[Message], *, model: str = ..., n: int = ..., temperature: float | None = ...,
             max_tokens: int | None = ..., stream: bool, **extra: Any) -> ChatCompletion | Stream: ...

    def chat(self, messages: Sequence[Message], *, model: str = "alignd", n: int = 1,
             temperature: float | None = None, max_tokens: int | None = None, stream: bool = False,
             **extra: Any) -> ChatCompletion | Stream:
        """``POST /v1/chat/completions``. ``extra`` adds any other request field (``top_p``, ``seed``, ``user``,
        ``stream_options``, ...). With ``stream=True`` the request is sent (and errors raised) now, and the
        chunks are read as the returned :class:`Stream` is iterated."""
        body = _chat_body(messages, model, n, temperature, max_tokens, stream, extra)
        if not stream:
            return self._call("POST", "/v1/chat/completions", ChatCompletion, body)
        return Stream(self._send("POST", "/v1/chat/completions", body, stream=True), self.base_url)

    def export(self, format: Literal["preferences", "events", "kto"] = "preferences",
               since: datetime | str | None = None, *, policy: int | None = None) -> Iterator[dict[str, Any]]:
        """``GET /v1/feedback/export`` (admin key): the JSONL lines as dicts, read as they stream in."""
        response = self._send("GET", "/v1/feedback/export", params=_export_params(format, since, policy), stream=True)
        try:
            for line in response.iter_lines():
                if line.strip():
                    yield msgspec.json.decode(line)
        except httpx.TransportError as e:
            raise _connection_error(e, self.base_url) from e
        finally:
            response.close()


class Feedback:
    """``POST /v1/feedback``, one method per built-in kind; :meth:`create` sends any kind (plugins' too)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, completion_id: str, kind: str, *, comment: str | None = None, tags: Sequence[str] | None = None,
               user: str | None = None, idempotency_key: str | None = None, **fields: Any) -> FeedbackCreated:
        """Feedback of any ``kind``; ``fields`` are the kind's own (``choice``, ``value``, ``ranking``, ...)."""
        body = _feedback_body(completion_id, kind, fields, comment, tags, user, idempotency_key)
        return self._client._call("POST", "/v1/feedback", FeedbackCreated, body, idempotent=True)

    def thumbs(self, completion_id: str, value: Literal["up", "down"] = "up", choice: int = 0,
               **common: Unpack[FeedbackOptions]) -> FeedbackCreated:
        """Thumbs up or down on one choice. Every method takes :class:`FeedbackOptions` as keywords."""
        return self.create(completion_id, "thumbs", value=value, choice=choice, **common)

    def rank(self, completion_id: str, ranking: Sequence[int], **common: Unpack[FeedbackOptions]
             ) -> FeedbackCreated:
        """Choice indices best first; a prefix is a partial ranking (each ranked choice beats all after it)."""
        return self.create(completion_id, "ranking", ranking=list(ranking), **common)

    def pairwise(self, completion_id: str, winner: Winner, choices: Sequence[int] | None = None,
                 **common: Unpack[FeedbackOptions]) -> FeedbackCreated:
        """Which of two choices (default 0 and 1) is better, or ``"tie"`` / ``"both_bad"``."""
        return self.create(completion_id, "pairwise", winner=winner,
                           choices=None if choices is None else list(choices), **common)

    def rate(self, completion_id: str, score: int, choice: int = 0, **common: Unpack[FeedbackOptions]
             ) -> FeedbackCreated:
        """A 1–10 score of one choice."""
        return self.create(completion_id, "rating", score=score, choice=choice, **common)

    def edit(self, completion_id: str, text: str, choice: int = 0, **common: Unpack[FeedbackOptions]
             ) -> FeedbackCreated:
        """The corrected reply for one choice."""
        return self.create(completion_id, "edit", text=text, choice=choice, **common)


def _canary_body(share: float | None, side_by_side: bool | None) -> dict[str, Any]:
    return {k: v for k, v in (("share", share), ("side_by_side", side_by_side)) if v is not None}


class Policies:
    """Policy versions (admin key)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> PolicyList:
        return self._client._call("GET", "/v1/policies", PolicyList)

    def get(self, version: int) -> Policy:
        return self._client._call("GET", f"/v1/policies/{int(version)}", Policy)

    def promote(self, version: int) -> Policy:
        """Serve ``version`` as ``alignd`` from now on."""
        return self._client._call("POST", f"/v1/policies/{int(version)}/promote", Policy, idempotent=True)

    def rollback(self, version: int | None = None) -> Policy:
        """Restore ``version``, or the previously promoted one."""
        body = None if version is None else {"version": version}
        return self._client._call("POST", "/v1/policies/rollback", Policy, body)

    def evaluation(self, version: int) -> PolicyEvaluation:
        """The offline gate's figures and the live test's (canary), with their intervals."""
        return self._client._call("GET", f"/v1/policies/{int(version)}/evaluation", PolicyEvaluation)

    def start_canary(self, version: int, share: float | None = None, side_by_side: bool | None = None) -> Policy:
        """Put candidate ``version`` on canary (or change the running canary's share); the server's defaults
        for what is left out."""
        return self._client._call("POST", f"/v1/policies/{int(version)}/canary", Policy,
                                  _canary_body(share, side_by_side))

    def promote_canary(self, version: int) -> Policy:
        """End the canary ``version`` by promoting it (409 if it is not the canary)."""
        return self._client._call("POST", f"/v1/policies/{int(version)}/canary/promote", Policy)

    def reject_canary(self, version: int) -> Policy:
        """End the canary ``version`` by rejecting it: it serves nothing more."""
        return self._client._call("POST", f"/v1/policies/{int(version)}/canary/reject", Policy)

    def stop_canary(self, version: int) -> Policy:
        """End the canary ``version`` without a verdict: back to candidate."""
        return self._client._call("POST", f"/v1/policies/{int(version)}/canary/stop", Policy)


class Training:
    """Training runs (admin key)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def start(self, iterations: int | None = None, rollout_batch_size: int | None = None,
              time_limit_s: float | None = None, promote: bool = True, objective: str | None = None) -> TrainingRun:
        """Start a run now (``ConflictError`` with code ``run_in_progress`` while one runs); ``objective``:
        ``ppo``, ``grpo``, ``rloo``, ``online-dpo`` or ``kto`` (default: the server's ``--objective``;
        ``ConflictError`` with code ``objective_needs_pairs`` or ``objective_needs_labels`` when the stored feedback
        cannot train it)."""
        body = _training_body(iterations, rollout_batch_size, time_limit_s, promote, objective)
        return self._client._call("POST", "/v1/training/runs", TrainingRun, body)

    def get(self, run_id: str) -> TrainingRun:
        return self._client._call("GET", f"/v1/training/runs/{run_id}", TrainingRun)

    def list(self, limit: int | None = None) -> TrainingRunList:
        params = None if limit is None else {"limit": str(limit)}
        return self._client._call("GET", "/v1/training/runs", TrainingRunList, params=params)

    def cancel(self, run_id: str) -> TrainingRun:
        return self._client._call("POST", f"/v1/training/runs/{run_id}/cancel", TrainingRun)


class Keys:
    """API keys (admin key): added and revoked at run time, without a restart."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> ApiKeyList:
        """Configured and stored keys (revoked ones included), never the keys themselves."""
        return self._client._call("GET", "/v1/admin/keys", ApiKeyList)

    def get(self, key_id: str) -> ApiKey:
        return self._client._call("GET", f"/v1/admin/keys/{key_id}", ApiKey)

    def create(self, name: str, role: PrincipalRole) -> ApiKeyCreated:
        """A new key for principal ``name``; ``.key`` is the key, shown this once (``ConflictError`` when the name
        has another role). Not retried once sent: a retry could make a second key."""
        return self._client._call("POST", "/v1/admin/keys", ApiKeyCreated, {"name": name, "role": role})

    def revoke(self, key_id: str) -> ApiKey:
        """Refused from now on (``ConflictError`` for a configured key or the last admin key)."""
        return self._client._call("DELETE", f"/v1/admin/keys/{key_id}", ApiKey, idempotent=True)


class Users:
    """End users (admin key): what is held of one, deleting it, and their trust states."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def get(self, user: str, *, principal: str | None = None) -> UserData:
        """Rows held of ``user`` per table (``NotFoundError``, code ``user_not_found``, when none); ``principal``
        counts only the rows made with that principal's keys."""
        return self._client._call("GET", _user_path(user), UserData, params=_principal_params(principal))

    def delete(self, user: str, *, principal: str | None = None) -> UserDeletion:
        """Delete every row of ``user`` (its completions with everything derived from them, and its feedback on
        others'); the counts removed. Idempotent, so retried like a GET."""
        return self._client._call("DELETE", _user_path(user), UserDeletion, params=_principal_params(principal),
                                  idempotent=True)

    def list(self, *, flagged: bool | None = None, trust: TrustState | None = None,
             limit: int | None = None) -> UserTrustList:
        """Users with a trust state or an agreement score, flagged ones first; ``flagged`` and ``trust`` filter."""
        return self._client._call("GET", "/v1/admin/users", UserTrustList,
                                  params=_user_list_params(flagged, trust, limit))

    def set_trust(self, user: str, trust: TrustState, *, note: str | None = None) -> UserTrust:
        """Set ``user``'s trust state: ``blocked`` (their feedback is kept but never trained on), ``trusted`` (never
        flagged by the agreement check) or ``default``; ``note`` says why."""
        return self._client._call("PATCH", _user_path(user), UserTrust, _trust_body(trust, note), idempotent=True)


class Retention:
    """Retention (admin key)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def run(self, older_than_days: int | None = None) -> RetentionRun:
        """Delete now the completions older than ``older_than_days`` (default: the server's ``--retain-days``;
        ``UnprocessableEntityError``, code ``retention_off``, when neither is set), with everything derived."""
        return self._client._call("POST", "/v1/admin/retention", RetentionRun, _retention_body(older_than_days),
                                  idempotent=True)


# --- async ---------------------------------------------------------------------------------------------------------


class AsyncStream(AsyncIterator[ChatCompletionChunk]):
    """The chunks of a streaming chat answer (async); ``await stream.close()`` or ``async with`` to stop early."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self._url = url
        self._done = False

    async def __anext__(self) -> ChatCompletionChunk:
        while not self._done:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                await self.close()
                raise APIConnectionError(f"The stream from {self._url} ended before [DONE].") from None
            except httpx.TransportError as e:
                await self.close()
                raise _connection_error(e, self._url) from e
            chunk = _sse_chunk(line)
            if chunk == "done":
                await self.close()
            elif chunk is not None:
                return chunk
        raise StopAsyncIteration

    async def close(self) -> None:
        self._done = True
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


class AsyncClient(_Base):
    """Asynchronous client: the same API as :class:`Client`, with coroutines and async iterators."""

    _sleep = staticmethod(asyncio.sleep)

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float | httpx.Timeout = 60,
                 max_retries: int = 3, *, http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self.feedback = AsyncFeedback(self)
        self.policies = AsyncPolicies(self)
        self.training = AsyncTraining(self)
        self.keys = AsyncKeys(self)
        self.users = AsyncUsers(self)
        self.retention = AsyncRetention(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _send(self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None, *,
                    stream: bool = False, idempotent: bool | None = None) -> httpx.Response:
        """Send with retries; return a successful response (open, for ``stream``) or raise the typed error."""
        request = self._request(method, path, body, params)
        idempotent = method == "GET" if idempotent is None else idempotent
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if not self._should_retry(attempt, error=e, idempotent=idempotent):
                    raise _connection_error(e, self.base_url) from e
                await self._sleep(backoff_s(attempt, None, self._rng))
            else:
                if response.is_success:
                    return response
                content = await response.aread()
                await response.aclose()
                if not self._should_retry(attempt, status=response.status_code):
                    raise _api_error(response.status_code, content, response.headers)
                await self._sleep(backoff_s(attempt, response.headers, self._rng))
            attempt += 1

    async def _call(self, method: str, path: str, type_: type[T], body: Any = None,
                    params: Mapping[str, str] | None = None, *, idempotent: bool | None = None) -> T:
        return _decode((await self._send(method, path, body, params, idempotent=idempotent)).content, type_)

    @overload
    async def chat(self, messages: Sequence[Message], *, model: str = ..., n: int = ...,
                   temperature: float | None = ..., max_tokens: int | None = ..., stream: Literal[False] = ...,
                   **extra: Any) -> ChatCompletion: ...

    @overload
    async def chat(self, messages: Sequence[Message], *, model: str = ..., n: int = ...,
                   temperature: float | None = ..., max_tokens: int | None = ..., stream: Literal[True],
                   **extra: Any) -> AsyncStream: ...

    @overload
    async def chat(self, messages: Sequence[Message], *, model: str = ..., n: int = ...,
                   temperature: float | None = ..., max_tokens: int | None = ..., stream: bool,
                   **extra: Any) -> ChatCompletion | AsyncStream: ...

    async def chat(self, messages: Sequence[Message], *, model: str = "alignd", n: int = 1,
                   temperature: float | None = None, max_tokens: int | None = None, stream: bool = False,
                   **extra: Any) -> ChatCompletion | AsyncStream:
        """``POST /v1/chat/completions``; with ``stream=True``, ``async for chunk in await client.chat(...)``."""
        body = _chat_body(messages, model, n, temperature, max_tokens, stream, extra)
        if not stream:
            return await self._call("POST", "/v1/chat/completions", ChatCompletion, body)
        return AsyncStream(await self._send("POST", "/v1/chat/completions", body, stream=True), self.base_url)

    async def export(self, format: Literal["preferences", "events", "kto"] = "preferences",
                     since: datetime | str | None = None, *, policy: int | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """``GET /v1/feedback/export`` (admin key): the JSONL lines as dicts, read as they stream in."""
        response = await self._send("GET", "/v1/feedback/export", params=_export_params(format, since, policy),
                                    stream=True)
        try:
            async for line in response.aiter_lines():
                if line.strip():
                    yield msgspec.json.decode(line)
        except httpx.TransportError as e:
            raise _connection_error(e, self.base_url) from e
        finally:
            await response.aclose()


class AsyncFeedback:
    """``POST /v1/feedback`` (async); see :class:`Feedback`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, completion_id: str, kind: str, *, comment: str | None = None,
                     tags: Sequence[str] | None = None, user: str | None = None,
                     idempotency_key: str | None = None, **fields: Any) -> FeedbackCreated:
        body = _feedback_body(completion_id, kind, fields, comment, tags, user, idempotency_key)
        return await self._client._call("POST", "/v1/feedback", FeedbackCreated, body, idempotent=True)

    async def thumbs(self, completion_id: str, value: Literal["up", "down"] = "up", choice: int = 0,
                     **common: Unpack[FeedbackOptions]) -> FeedbackCreated:
        return await self.create(completion_id, "thumbs", value=value, choice=choice, **common)

    async def rank(self, completion_id: str, ranking: Sequence[int],
                   **common: Unpack[FeedbackOptions]) -> FeedbackCreated:
        return await self.create(completion_id, "ranking", ranking=list(ranking), **common)

    async def pairwise(self, completion_id: str, winner: Winner, choices: Sequence[int] | None = None,
                       **common: Unpack[FeedbackOptions]) -> FeedbackCreated:
        return await self.create(completion_id, "pairwise", winner=winner,
                                 choices=None if choices is None else list(choices), **common)

    async def rate(self, completion_id: str, score: int, choice: int = 0,
                   **common: Unpack[FeedbackOptions]) -> FeedbackCreated:
        return await self.create(completion_id, "rating", score=score, choice=choice, **common)

    async def edit(self, completion_id: str, text: str, choice: int = 0,
                   **common: Unpack[FeedbackOptions]) -> FeedbackCreated:
        return await self.create(completion_id, "edit", text=text, choice=choice, **common)


class AsyncPolicies:
    """Policy versions (admin key, async); see :class:`Policies`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> PolicyList:
        return await self._client._call("GET", "/v1/policies", PolicyList)

    async def get(self, version: int) -> Policy:
        return await self._client._call("GET", f"/v1/policies/{int(version)}", Policy)

    async def promote(self, version: int) -> Policy:
        return await self._client._call("POST", f"/v1/policies/{int(version)}/promote", Policy, idempotent=True)

    async def rollback(self, version: int | None = None) -> Policy:
        body = None if version is None else {"version": version}
        return await self._client._call("POST", "/v1/policies/rollback", Policy, body)

    async def evaluation(self, version: int) -> PolicyEvaluation:
        return await self._client._call("GET", f"/v1/policies/{int(version)}/evaluation", PolicyEvaluation)

    async def start_canary(self, version: int, share: float | None = None, side_by_side: bool | None = None
                           ) -> Policy:
        return await self._client._call("POST", f"/v1/policies/{int(version)}/canary", Policy,
                                        _canary_body(share, side_by_side))

    async def promote_canary(self, version: int) -> Policy:
        return await self._client._call("POST", f"/v1/policies/{int(version)}/canary/promote", Policy)

    async def reject_canary(self, version: int) -> Policy:
        return await self._client._call("POST", f"/v1/policies/{int(version)}/canary/reject", Policy)

    async def stop_canary(self, version: int) -> Policy:
        return await self._client._call("POST", f"/v1/policies/{int(version)}/canary/stop", Policy)


class AsyncTraining:
    """Training runs (admin key, async); see :class:`Training`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def start(self, iterations: int | None = None, rollout_batch_size: int | None = None,
                    time_limit_s: float | None = None, promote: bool = True, objective: str | None = None
                    ) -> TrainingRun:
        body = _training_body(iterations, rollout_batch_size, time_limit_s, promote, objective)
        return await self._client._call("POST", "/v1/training/runs", TrainingRun, body)

    async def get(self, run_id: str) -> TrainingRun:
        return await self._client._call("GET", f"/v1/training/runs/{run_id}", TrainingRun)

    async def list(self, limit: int | None = None) -> TrainingRunList:
        params = None if limit is None else {"limit": str(limit)}
        return await self._client._call("GET", "/v1/training/runs", TrainingRunList, params=params)

    async def cancel(self, run_id: str) -> TrainingRun:
        return await self._client._call("POST", f"/v1/training/runs/{run_id}/cancel", TrainingRun)


class AsyncKeys:
    """API keys (admin key, async); see :class:`Keys`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> ApiKeyList:
        return await self._client._call("GET", "/v1/admin/keys", ApiKeyList)

    async def get(self, key_id: str) -> ApiKey:
        return await self._client._call("GET", f"/v1/admin/keys/{key_id}", ApiKey)

    async def create(self, name: str, role: PrincipalRole) -> ApiKeyCreated:
        return await self._client._call("POST", "/v1/admin/keys", ApiKeyCreated, {"name": name, "role": role})

    async def revoke(self, key_id: str) -> ApiKey:
        return await self._client._call("DELETE", f"/v1/admin/keys/{key_id}", ApiKey, idempotent=True)


class AsyncUsers:
    """End users' stored data (admin key, async); see :class:`Users`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def get(self, user: str, *, principal: str | None = None) -> UserData:
        return await self._client._call("GET", _user_path(user), UserData, params=_principal_params(principal))

    async def delete(self, user: str, *, principal: str | None = None) -> UserDeletion:
        return await self._client._call("DELETE", _user_path(user), UserDeletion,
                                        params=_principal_params(principal), idempotent=True)

    async def list(self, *, flagged: bool | None = None, trust: TrustState | None = None,
                   limit: int | None = None) -> UserTrustList:
        return await self._client._call("GET", "/v1/admin/users", UserTrustList,
                                        params=_user_list_params(flagged, trust, limit))

    async def set_trust(self, user: str, trust: TrustState, *, note: str | None = None) -> UserTrust:
        return await self._client._call("PATCH", _user_path(user), UserTrust, _trust_body(trust, note),
                                        idempotent=True)


class AsyncRetention:
    """Retention (admin key, async); see :class:`Retention`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def run(self, older_than_days: int | None = None) -> RetentionRun:
        return await self._client._call("POST", "/v1/admin/retention", RetentionRun,
                                        _retention_body(older_than_days), idempotent=True)
