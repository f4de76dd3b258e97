"""Typed domain errors. Services raise these; one exception handler maps them to OpenAI's error shape."""

from __future__ import annotations


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


class EngineFailure(AlignError):
    """The engine failed while generating: the client's request was fine."""

    status = 500
    type = "server_error"
    default_code = "engine_error"
