"""API and admin keys: ``Authorization: Bearer KEY``, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from alignd.errors import Forbidden, Unauthorized


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
