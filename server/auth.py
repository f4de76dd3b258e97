"""Who may call: API and admin keys (``Authorization: Bearer KEY``, compared in constant time), and which Host
headers the server answers to."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from alignd.errors import Forbidden, InvalidRequest, Unauthorized
from alignd.limits import key_caller


def _matches(key: str, keys: Sequence[str]) -> bool:
    # Compare against every key without stopping early so timing does not reveal which one (or how many) matched.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The bearer token of a request, if any."""
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class KeyChecker:
    """Decides who may call what: API keys for ``/v1/*`` (open when none configured), admin keys for operators."""

    def __init__(self, api_keys: Sequence[str], admin_keys: Sequence[str]) -> None:
        self.api_keys = list(api_keys)
        self.admin_keys = list(admin_keys)

    def check_user(self, token: str | None) -> None:
        """Admit a client of the chat and feedback API."""
        if not self.api_keys:
            return
        if token is None:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        if not (_matches(token, self.api_keys) or _matches(token, self.admin_keys)):
            raise Unauthorized("Invalid API key.")

    def caller(self, token: str | None, address: str | None) -> str | None:
        """Whom per-caller limits count this request against: its key (hashed) when keys are configured, else its
        client address. None for a key that is not accepted (the guard refuses it)."""
        if not self.api_keys:
            return f"address:{address or 'unknown'}"
        if token is None or not (_matches(token, self.api_keys) or _matches(token, self.admin_keys)):
            return None
        return key_caller(token)

    def check_admin(self, token: str | None) -> None:
        """Admit an operator: only an admin key will do."""
        if not self.admin_keys:
            raise Forbidden("Operator endpoints are disabled: no admin key is configured (--admin-key).")
        if token is None:
            raise Unauthorized("Missing admin key: send 'Authorization: Bearer <admin key>'.")
        if _matches(token, self.admin_keys):
            return
        if _matches(token, self.api_keys):
            raise Forbidden("This endpoint needs an admin key; an API key was given.")
        raise Unauthorized("Invalid admin key.")


async def user_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard for the client API."""
    connection.app.state.services.key_checker.check_user(bearer(connection))


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard for operator endpoints."""
    connection.app.state.services.key_checker.check_admin(bearer(connection))


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
