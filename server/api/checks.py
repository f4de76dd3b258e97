"""What every request must pass before any route (a plugin's too) runs: an allowed Host header, a JSON body if it has
one, and the body limit. Refusals are OpenAI-shaped 4xx answers sent from here, before anything is read or done.

JSON only, because a browser sends a ``text/plain`` or form body to another site without asking it first (no CORS
preflight); an ``application/json`` one it may not send there at all.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from litestar.datastructures import Headers
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Receive, Scope, Send

from alignd.errors import AlignError, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from alignd.protocol import ErrorDetail, ErrorResponse


def error_response(exc: AlignError) -> ASGIResponse:
    """``exc`` as an OpenAI-shaped response, for refusals made outside a route handler (no exception handler
    runs there, and the metrics middleware must see the status)."""
    body = ErrorResponse(error=ErrorDetail(message=exc.message, type=exc.type, param=exc.param, code=exc.code))
    return ASGIResponse(body=msgspec.json.encode(body), status_code=exc.status, headers=exc.headers,
                        media_type="application/json")


def request_checks(app: ASGIApp) -> ASGIApp:
    """Middleware: refuse a disallowed Host (400), a body that is not JSON (415) or that says it is over the body
    limit (413). A body that grows past the limit unannounced is cut by Litestar (``request_max_body_size``)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            services = scope["litestar_app"].state.services
            try:
                check_request(Headers.from_scope(scope), services.allowed_hosts.check,
                              services.settings.server.max_body_bytes)
            except AlignError as e:
                await error_response(e)(scope, receive, send)
                return
        await app(scope, receive, send)

    return middleware


def check_request(headers: Headers, check_host: Callable[[str | None], None], max_body_bytes: int) -> None:
    """The checks of :func:`request_checks` on one request's headers."""
    check_host(headers.get("host"))
    length = headers.get("content-length")
    if length is not None and not length.strip().isdigit():
        raise InvalidRequest(f"Invalid Content-Length: {length!r}.")
    has_body = (length is not None and int(length) > 0) or "transfer-encoding" in headers
    if not has_body:
        return
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/")
                                                 and media_type.endswith("+json")):
        raise UnsupportedMediaType(f"Request bodies must be JSON: send 'Content-Type: application/json' (got "
                                   f"{media_type or 'none'!r}).")
    if length is not None and int(length) > max_body_bytes:
        raise PayloadTooLarge(f"Request body is {int(length)} bytes; the limit is {max_body_bytes}.")
