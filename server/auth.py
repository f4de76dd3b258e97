"""Who may call what: the guards of the routes, over the key ring (:mod:`alignd.keys`), and which Host headers the
server answers to.

A guard puts the caller's principal (None: an anonymous caller of an open server) in the request's scope as
``auth`` (``request.auth``, and the ``principal`` dependency). The client API is open while no ``user`` or
``frontend`` key exists; operator endpoints take admin keys only; ``/metrics`` takes an admin, frontend or metrics
key once any of those is needed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from alignd.errors import AlignError, Forbidden, InvalidRequest, Unauthorized
from alignd.keys import KeyRing
from alignd.limits import key_caller
from alignd.principals import Principal


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The bearer token of a request, if any."""
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(keys: KeyRing, token: str | None) -> Principal | None:
    """The caller of the client API: the principal of a valid key, or None (anonymous) while the client API is
    open. A key that is wrong, revoked or missing is a 401 once ``user`` or ``frontend`` keys exist. On an open
    server a token that is no key (the openai SDK always sends one) is anonymous, as if none were sent."""
    principal = await keys.identify(token) if token is not None else None
    if principal is not None or not await keys.client_keys_in_use():
        return principal
    if token is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    raise Unauthorized("Invalid API key.")


async def authorize_admin(keys: KeyRing, token: str | None) -> Principal:
    """An operator: an admin key only."""
    if not await keys.admin_keys_exist():
        raise Forbidden("Operator endpoints are disabled: no admin key is configured (--admin-key, or "
                        "--key NAME:admin:KEY).")
    if token is None:
        raise Unauthorized("Missing admin key: send 'Authorization: Bearer <admin key>'.")
    principal = await keys.identify(token)
    if principal is None:
        raise Unauthorized("Invalid admin key.")
    if not principal.is_admin:
        raise Forbidden(f"This endpoint needs an admin key; a {principal.role} key was given.")
    return principal


async def authorize_metrics(keys: KeyRing, token: str | None) -> None:
    """A reader of ``/metrics``: open with the client API unless metrics keys are set; else a metrics, admin or
    frontend key (a service, not an end user: a ``user`` key is a 403)."""
    if not keys.guards_metrics and not await keys.client_keys_in_use():
        return
    if token is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    if keys.is_metrics_key(token):
        return
    principal = await keys.identify(token)
    if principal is None:
        raise Unauthorized("Invalid API key.")
    if principal.role == "user":
        raise Forbidden("/metrics needs a metrics, frontend or admin key; a user key was given.")


def _keys(connection: ASGIConnection[Any, Any, Any, Any]) -> KeyRing:
    return connection.app.state.services.keys


async def caller_principal(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal | None:
    """The client API's caller (see :func:`authenticate`), found once per request and kept in its scope."""
    if "auth" not in connection.scope:
        connection.scope["auth"] = await authenticate(_keys(connection), bearer(connection))
    return connection.scope["auth"]


async def limits_caller(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """Whom per-caller limits count a request against: its key (hashed) when it has a valid one, else its client
    address (an anonymous caller of an open server). None for a request the guard will refuse: it spends nothing."""
    try:
        principal = await caller_principal(connection)
    except AlignError:
        return None
    if principal is not None:
        return key_caller(bearer(connection) or "")
    return f"address:{connection.client.host if connection.client else 'unknown'}"


async def user_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard for the client API (chat, feedback, the schema, plugin routes with ``auth="user"``)."""
    await caller_principal(connection)


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard for operator endpoints."""
    connection.scope["auth"] = await authorize_admin(_keys(connection), bearer(connection))


async def metrics_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard for ``/metrics``."""
    await authorize_metrics(_keys(connection), bearer(connection))


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal | None:
    """The principal a guard found for this request (None: anonymous, or a route without a guard)."""
    return connection.scope.get("auth")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost`` or a loopback address)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class AllowedHosts:
    """The Host headers the server answers to: ``allowed`` names (``*.example.com`` matches its subdomains, ``*``
    anything); none given: the loopback names when ``bind`` is a loopback address (a web page elsewhere cannot reach
    the server through DNS rebinding), otherwise any."""

    def __init__(self, allowed: Sequence[str], bind: str) -> None:
        names = [h.strip().lower() for h in allowed if h.strip()] or (
            list(LOOPBACK_HOSTS) if is_loopback(bind) else ["*"])
        self.any = "*" in names
        self.exact = {n.strip("[]") for n in names if not n.startswith("*.")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".example.com"

    def check(self, host_header: str | None) -> None:
        """Refuse (400) a Host header that names no allowed host. Without one (not a browser) there is nothing to
        check."""
        if self.any or host_header is None:
            return
        host = _host_name(host_header)
        if host in self.exact or (self.suffixes and host.endswith(self.suffixes)):
            return
        raise InvalidRequest(f"Host {host_header!r} is not served here; allowed hosts are set with --allowed-host.",
                             code="invalid_host")


def _host_name(header: str) -> str:
    """The host of a Host header, without its port or IPv6 brackets, lower-case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header
