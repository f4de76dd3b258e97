"""``alignd keys``: list, add and revoke a running server's API keys (admin key), and generate a key for the
configuration.

Exit status: 0 on success, 1 when the server refused or could not be reached.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys

import msgspec

from alignd.clients.sdk import AligndError, Client
from alignd.protocol import ApiKey


def _row(key: ApiKey) -> str:
    state = f"revoked {key.revoked}" if key.revoked else "active"
    origin = "config" if key.source == "config" else f"added {key.created} by {key.created_by or '?'}"
    return f"{key.id:<24}  {key.name:<24}  {key.role:<8}  {state:<32}  {origin}"


def list_keys(*, url: str, admin_key: str | None, as_json: bool) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            keys = client.keys.list().data
        except AligndError as e:
            print(f"alignd keys: {e}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(msgspec.to_builtins(keys), indent=2))
        return 0
    print(f"{'ID':<24}  {'NAME':<24}  {'ROLE':<8}  {'STATE':<32}  ORIGIN")
    for key in keys:
        print(_row(key))
    return 0


def add_key(*, url: str, admin_key: str | None, name: str, role: str, as_json: bool) -> int:
    """Add a key and print it: the only time anyone sees it."""
    with Client(url, api_key=admin_key) as client:
        try:
            created = client.keys.create(name, role)  # type: ignore[arg-type]
        except AligndError as e:
            print(f"alignd keys: {e}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(msgspec.to_builtins(created), indent=2))
    else:
        print(created.key)
        print(
            f"key {created.id} for {created.role} principal {created.name!r}: shown once, keep it now", file=sys.stderr
        )
    return 0


def revoke_key(*, url: str, admin_key: str | None, key_id: str) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            revoked = client.keys.revoke(key_id)
        except AligndError as e:
            print(f"alignd keys: {e}", file=sys.stderr)
            return 1
    print(f"revoked {revoked.id} ({revoked.role} principal {revoked.name!r}) at {revoked.revoked}")
    return 0


def generate_key() -> int:
    """A random key for the configuration, and the digest form that keeps it out of the configuration."""
    key = secrets.token_urlsafe(32)
    print(key)
    print(f"sha256:{hashlib.sha256(key.encode()).hexdigest()}")
    print(
        "configure it as --key NAME:ROLE:<key> or, keeping only its digest, --key NAME:ROLE:sha256:<hex>; the "
        "client sends the key itself",
        file=sys.stderr,
    )
    return 0
