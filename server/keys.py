"""API keys: which principal a bearer token stands for, and the keys operators add and revoke at run time.

Keys come from two places. The configuration (``--api-key``: principal ``api``, role ``frontend``; ``--admin-key``:
principal ``admin``; ``--key NAME:ROLE:KEY``; ``--metrics-key``, for ``/metrics`` only) is fixed for the process.
The database holds the keys added through the admin API, so that every replica sees the same ones; a key is
``alignd-<id>-<secret>``, and its id finds its row.

Only SHA-256 digests are kept, in memory and in the database, and a token is compared with them in constant time
(``hmac.compare_digest``, against every configured key, without stopping at a match). A fast hash is enough:
generated keys carry 256 random bits, far beyond guessing, so a slow password hash (bcrypt, argon2) would only add
milliseconds to every request. Configured keys are the operator's choice: make them long and random too.

What the database says about a key is cached for ``key_cache_s`` (1 s by default), per replica: a key revoked here
is refused here at once, on other replicas within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar, get_args

import msgspec

from alignd.config import ConfigError, ServerSettings
from alignd.errors import Conflict, DatabaseUnavailable, NotFound, Unavailable
from alignd.principals import Principal
from alignd.protocol import PRINCIPAL_NAME_PATTERN, ApiKey, ApiKeyCreated, PrincipalRole
from alignd.store import KeyRow, RoleConflictError, Store
from alignd.store.faults import outage

__all__ = ["KEY_PREFIX", "ConfigKey", "KeyRing", "config_keys", "digest", "generate_key", "stored_key_id"]

log = logging.getLogger(__name__)

KEY_PREFIX = "alignd-"
_ID_HEX = 16
_STORED_KEY = re.compile(rf"^{KEY_PREFIX}(?P<id>[0-9a-f]{{{_ID_HEX}}})-[A-Za-z0-9_-]{{43}}$")
_SHA256 = re.compile(r"^sha256:(?P<hex>[0-9a-fA-F]{64})$")
_NAME = re.compile(PRINCIPAL_NAME_PATTERN)
ROLES: tuple[str, ...] = get_args(PrincipalRole)
_CACHE_MAX = 10_000  # keys remembered per replica (tokens of unknown ids too, so that a flood of them is cheap)
T = TypeVar("T")


def digest(key: str) -> str:
    """The SHA-256 of a key, hex: what is stored and compared."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new stored key: ``(id, key)``."""
    key_id = secrets.token_hex(_ID_HEX // 2)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def stored_key_id(token: str) -> str | None:
    """The id of a token shaped like a generated key (it may still be wrong), else None."""
    match = _STORED_KEY.match(token)
    return match.group("id") if match else None


@dataclass(frozen=True, slots=True)
class ConfigKey:
    """A key of the configuration: its principal and digest (the key itself is not kept)."""

    principal: Principal
    digest: str


def _configured_digest(key: str) -> str:
    match = _SHA256.match(key)
    return match.group("hex").lower() if match else digest(key)


def config_keys(server: ServerSettings) -> list[ConfigKey]:
    """The configured keys as principals; a malformed ``--key`` or a name given two roles is a ConfigError."""
    entries: list[tuple[str, str, str, str]] = []  # (id, name, role, key)
    entries += [(f"config-api-key-{i}", "api", "frontend", k) for i, k in enumerate(server.api_keys, 1)]
    entries += [(f"config-admin-key-{i}", "admin", "admin", k) for i, k in enumerate(server.admin_keys, 1)]
    for i, spec in enumerate(server.keys, 1):
        name, _, rest = spec.partition(":")
        role, _, key = rest.partition(":")
        if not _NAME.match(name) or len(name) > 128 or role not in ROLES or not key:
            raise ConfigError(
                f"invalid setting: server.keys (--key) entry {i}: expected NAME:ROLE:KEY with ROLE one of "
                f"{', '.join(ROLES)} and NAME of letters, digits and . _ @ + - (the entry is not shown: it may hold "
                "a key)"
            )
        entries.append((f"config-key-{i}", name, role, key))
    roles: dict[str, str] = {}
    for _, name, role, _ in entries:
        if roles.setdefault(name, role) != role:
            raise ConfigError(
                f"invalid setting: principal {name!r} is given two roles ({roles[name]} and {role}); "
                "--api-key keys are principal 'api' (frontend), --admin-key keys principal 'admin'"
            )
    return [
        ConfigKey(Principal(name=name, role=role, key_id=key_id), _configured_digest(key))  # type: ignore[arg-type]
        for key_id, name, role, key in entries
    ]


def _matches(token_digest: str, digests: list[str]) -> int | None:
    # Every digest is compared, without stopping early, so that timing tells nothing of which (or how many) match.
    found = None
    for i, candidate in enumerate(digests):
        if hmac.compare_digest(token_digest, candidate) and found is None:
            found = i
    return found


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment is not None else None


class KeyRing:
    """The keys of one app: the configured ones and those in its store."""

    def __init__(self, store: Store, server: ServerSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.configured = config_keys(server)
        self._config_digests = [k.digest for k in self.configured]
        self._metrics_digests = [_configured_digest(k) for k in server.metrics_keys]
        self.cache_s = server.key_cache_s
        self._clock = clock
        self._rows: OrderedDict[str, tuple[float, KeyRow | None]] = OrderedDict()
        self._census: tuple[float, dict[str, int]] | None = None

    async def check_store(self) -> None:
        """Refuse to start (ConfigError) when a configured principal's name has another role among the stored
        keys: ownership goes by name, so the two would share each other's completions."""
        stored = await self.store.key_roles()
        for key in self.configured:
            role = stored.get(key.principal.name)
            if role is not None and role != key.principal.role:
                raise ConfigError(
                    f"principal {key.principal.name!r} is configured as {key.principal.role} but the "
                    f"database has keys for it as {role}; configure another name"
                )

    # --- who is calling --------------------------------------------------------------------------------------

    async def identify(self, token: str) -> Principal | None:
        """The principal ``token`` stands for; None for a key that is unknown, revoked or wrong."""
        token_digest = digest(token)
        if (i := _matches(token_digest, self._config_digests)) is not None:
            return self.configured[i].principal
        key_id = stored_key_id(token)
        if key_id is None:
            return None
        row = await self._row(key_id)
        if row is None or row.revoked is not None or not hmac.compare_digest(token_digest, row.key_hash):
            return None
        return Principal(name=row.name, role=row.role, key_id=row.id)  # type: ignore[arg-type]

    def is_metrics_key(self, token: str) -> bool:
        return _matches(digest(token), self._metrics_digests) is not None

    @property
    def guards_metrics(self) -> bool:
        """Whether metrics keys are configured: then /metrics needs a key even on an open server."""
        return bool(self._metrics_digests)

    async def client_keys_in_use(self) -> bool:
        """Whether any ``user`` or ``frontend`` key exists (configured or stored, not revoked): then the client API
        takes keys only; otherwise it is open, and a request without a valid key is an anonymous caller."""
        if any(k.principal.role != "admin" for k in self.configured):
            return True
        census = await self._active()
        return bool(census.get("user") or census.get("frontend"))

    async def admin_keys_exist(self) -> bool:
        if any(k.principal.is_admin for k in self.configured):
            return True
        return bool((await self._active()).get("admin"))

    # --- operators -------------------------------------------------------------------------------------------

    async def list_keys(self) -> list[ApiKey]:
        """The configured keys, then the stored ones (revoked included), oldest first."""
        listed = [
            ApiKey(
                id=k.principal.key_id,
                name=k.principal.name,
                role=k.principal.role,
                source="config",
                created=None,
                created_by=None,
            )
            for k in self.configured
        ]
        rows = await self._db(self.store.list_keys())
        return listed + [_api_key(row) for row in rows]

    async def get_key(self, key_id: str) -> ApiKey:
        for k in self.configured:
            if k.principal.key_id == key_id:
                return ApiKey(
                    id=key_id,
                    name=k.principal.name,
                    role=k.principal.role,
                    source="config",
                    created=None,
                    created_by=None,
                )
        row = await self._db(self.store.get_key(key_id))
        if row is None:
            raise NotFound(f"No API key with id {key_id!r}.", param="id")
        return _api_key(row)

    async def create_key(self, name: str, role: PrincipalRole, *, by: Principal | None) -> ApiKeyCreated:
        """A new key for principal ``name`` with ``role`` (409 when the name has another role); the key is in the
        answer, and nowhere else."""
        key_id, key = generate_key()
        row = KeyRow(
            id=key_id,
            name=name,
            role=role,
            key_hash=digest(key),
            created=datetime.now(UTC),
            created_by=by.name if by else None,
        )
        reserved = [(k.principal.name, k.principal.role) for k in self.configured]
        try:
            await self._db(self.store.insert_key(row, reserved=reserved))
        except RoleConflictError as e:
            raise Conflict(
                f"Principal {name!r} is a {e.role} principal; a name keeps the role it was first given. "
                "Choose another name.",
                param="role",
                code="principal_role_conflict",
            ) from e
        self._forget(key_id)
        log.info("API key %s added for principal %r (%s) by %s", key_id, name, role, row.created_by)
        return ApiKeyCreated(**msgspec.structs.asdict(_api_key(row)), key=key)

    async def revoke_key(self, key_id: str, *, by: Principal | None) -> ApiKey:
        """Revoke a stored key: refused at once here, within ``key_cache_s`` on other replicas. A configured key
        (409) is removed from the configuration instead; the last admin key (409) is kept, so that the operator
        endpoints stay reachable."""
        if any(k.principal.key_id == key_id for k in self.configured):
            raise Conflict(
                f"API key {key_id!r} comes from the configuration; remove it there and restart.",
                param="id",
                code="configured_key",
            )
        row = await self._db(self.store.get_key(key_id))
        if row is None:
            raise NotFound(f"No API key with id {key_id!r}.", param="id")
        if row.revoked is None and row.role == "admin" and not any(k.principal.is_admin for k in self.configured):
            self._census = None
            if (await self._active()).get("admin", 0) <= 1:
                raise Conflict(
                    "This is the last admin key: add another admin key before revoking it, or no one "
                    "could reach the operator endpoints.",
                    param="id",
                    code="last_admin_key",
                )
        revoked = await self._db(self.store.revoke_key(key_id, datetime.now(UTC), by.name if by else None))
        self._forget(key_id)
        log.info("API key %s of principal %r revoked by %s", key_id, row.name, by.name if by else None)
        return _api_key(revoked or row)

    # --- the database, cached ---------------------------------------------------------------------------------

    async def _row(self, key_id: str) -> KeyRow | None:
        now = self._clock()
        cached = self._rows.get(key_id)
        if cached is not None and now < cached[0]:
            return cached[1]
        row = await self._db(self.store.get_key(key_id))
        if self.cache_s > 0:
            self._rows[key_id] = (now + self.cache_s, row)
            self._rows.move_to_end(key_id)
            if len(self._rows) > _CACHE_MAX:
                self._rows.popitem(last=False)
        return row

    async def _active(self) -> dict[str, int]:
        now = self._clock()
        if self._census is not None and now < self._census[0]:
            return self._census[1]
        census = await self._db(self.store.count_active_keys())
        if self.cache_s > 0:
            self._census = (now + self.cache_s, census)
        return census

    def _forget(self, key_id: str) -> None:
        self._rows.pop(key_id, None)
        self._census = None

    async def _db(self, work: Awaitable[T]) -> T:
        # Fail closed: a key that cannot be checked is not accepted, and the caller is told to come back.
        try:
            return await work
        except (RoleConflictError, Unavailable):
            raise
        except Exception as e:
            log.warning("API keys cannot be read from the database: %s: %s", type(e).__name__, getattr(e, "orig", e))
            if (reason := outage(e)) is not None:
                raise DatabaseUnavailable.of(reason) from e
            raise Unavailable(
                "API keys cannot be checked right now; retry shortly.", headers={"Retry-After": "5"}
            ) from e


def _api_key(row: KeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        role=row.role,  # type: ignore[arg-type]
        source="database",
        created=_iso(row.created),
        created_by=row.created_by,
        revoked=_iso(row.revoked),
        revoked_by=row.revoked_by,
    )
