"""``alignd users`` and ``alignd retention``: what a running server holds of an end user, deleting it, users' trust
states and agreement scores, and a retention pass now (admin key).

Exit status: 0 on success, 1 when the server refused or could not be reached (``users show`` of a user with nothing
stored is a refusal: 404).
"""

from __future__ import annotations

import json
import sys

import msgspec

from alignd.clients.sdk import AligndError, Client
from alignd.protocol import RowCounts, TrustState, UserTrust


def _rows(counts: RowCounts) -> str:
    return ", ".join(f"{count} {table.replace('_', ' ')}" for table, count in msgspec.structs.asdict(counts).items())


def _print(value: msgspec.Struct, as_json: bool, text: str) -> int:
    print(json.dumps(msgspec.to_builtins(value), indent=2) if as_json else text)
    return 0


def show_user(*, url: str, admin_key: str | None, user: str, principal: str | None, as_json: bool) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            data = client.users.get(user, principal=principal)
        except AligndError as e:
            print(f"alignd users: {e}", file=sys.stderr)
            return 1
    trust = f"\n{_trust_line(data.trust)}" if data.trust is not None else ""
    return _print(data, as_json, f"user {data.user!r} has {_rows(data.rows)} stored{trust}")


def delete_user(*, url: str, admin_key: str | None, user: str, principal: str | None, as_json: bool) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            deleted = client.users.delete(user, principal=principal)
        except AligndError as e:
            print(f"alignd users: {e}", file=sys.stderr)
            return 1
    return _print(deleted, as_json, f"deleted {_rows(deleted.deleted)} of user {deleted.user!r}")


def _trust_line(entry: UserTrust) -> str:
    score = (f"agreement {entry.agreement:.2f} on {entry.judgements} judgements (p={entry.p_value:.2g}, "
             f"run {entry.scored_run})" if entry.agreement is not None else "not scored")
    flag = "FLAGGED  " if entry.flagged else ""
    note = f"  ({entry.note})" if entry.note else ""
    return f"{flag}{entry.user!r}: {entry.trust}, {score}{note}"


def list_users(*, url: str, admin_key: str | None, flagged: bool | None, trust: TrustState | None,
               as_json: bool) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            listing = client.users.list(flagged=flagged, trust=trust)
        except AligndError as e:
            print(f"alignd users: {e}", file=sys.stderr)
            return 1
    return _print(listing, as_json, "\n".join(_trust_line(entry) for entry in listing.data) or "no users")


def set_trust(*, url: str, admin_key: str | None, user: str, trust: TrustState, note: str | None,
              as_json: bool) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            entry = client.users.set_trust(user, trust, note=note)
        except AligndError as e:
            print(f"alignd users: {e}", file=sys.stderr)
            return 1
    return _print(entry, as_json, _trust_line(entry))


def run_retention(*, url: str, admin_key: str | None, older_than_days: int | None, as_json: bool) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            run = client.retention.run(older_than_days)
        except AligndError as e:
            print(f"alignd retention: {e}", file=sys.stderr)
            return 1
    return _print(run, as_json, f"deleted {_rows(run.deleted)} older than {run.older_than_days} days "
                                f"(created before {run.cutoff})")
