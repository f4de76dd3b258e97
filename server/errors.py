"""Typed domain errors. Services raise these; one exception handler maps them to OpenAI's error shape."""

from __future__ import annotations

from typing import ClassVar


class AlignError(Exception):
    """Base of every error a client is told about: HTTP status, OpenAI error type, offending field, code."""

    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}


class InvalidRequest(AlignError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(AlignError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(AlignError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_permissions"


class NotFound(AlignError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(AlignError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(AlignError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(AlignError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class Unprocessable(AlignError):
    status = 422
    type = "invalid_request_error"


class InvalidFeedback(Unprocessable):
    """Feedback that its kind's plugin refuses (choice out of range, ranking not distinct, ...): 422 naming the field.

    Feedback plugins raise it from their converters."""

    default_code = "invalid_feedback"


class RateLimited(AlignError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class Unavailable(AlignError):
    status = 503
    type = "server_error"
    default_code = "unavailable"


class DatabaseUnavailable(Unavailable):
    """The database failed (unreachable, restarting, its connections lost, too slow, out of disk): the request's
    write was rolled back (nothing half-written), and the same request can be sent again. A 503, which clients
    retry (OpenAI's SDKs among them), not a 507: WebDAV's "insufficient storage" means nothing more to a client,
    and a full disk is an operator's to fix, after which the retry succeeds."""

    default_code = "database_unavailable"
    retry_after_s: ClassVar[dict[str, int]] = {"unavailable": 5, "timeout": 5, "full": 30}
    reason = "unavailable"
    """The outage (:data:`alignd.store.faults.Outage`): unavailable, timeout or full."""

    @classmethod
    def of(cls, reason: str) -> DatabaseUnavailable:
        """The error for an outage: its message says what the client can do, and nothing of the database's own
        error text."""
        if reason == "full":
            error = cls("The server's database is out of disk space; retry later.", code="database_full",
                        headers={"Retry-After": str(cls.retry_after_s["full"])})
        else:
            error = cls("The server's database is unavailable right now; retry shortly.",
                        headers={"Retry-After": str(cls.retry_after_s.get(reason, 5))})
        error.reason = reason
        return error


class EngineFailure(AlignError):
    """The engine failed while generating: the client's request was fine."""

    status = 500
    type = "server_error"
    default_code = "engine_error"


class PluginFailed(AlignError):
    """A feedback plugin raised on the request path (``prepare_feedback``, a converter, ``filter_feedback``): the
    event is refused, nothing is stored. The message names the plugin and the hook; the log has the traceback."""

    default_code = "plugin_failed"


class PluginTimeout(Unavailable):
    """The feedback plugins' request-path calls outlasted ``hook_timeout_s``: the event is refused, nothing is
    stored, and the same request may be sent again."""

    default_code = "plugin_timeout"
