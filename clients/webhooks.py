"""Checking on the receiving side that a webhook request came from alignd, unaltered and recently.

alignd's ``webhook`` plugin signs every POST with ``webhook_secret``: ``X-Alignd-Timestamp`` is the Unix time (whole
seconds) of the attempt and ``X-Alignd-Signature-V1`` the hex HMAC-SHA256 of ``"<timestamp>." + body``. Because the
timestamp is signed, a receiver that refuses old timestamps refuses a captured request replayed later; within the
window, ``X-Alignd-Event`` (the feedback event's id, the same on every retry) tells a duplicate apart::

    from alignd.clients.webhooks import WebhookVerificationError, verify

    try:
        verify(raw_body, request.headers, secret)  # the body exactly as received, before any JSON parsing
    except WebhookVerificationError as e:
        return 400, str(e)

Standard library only, so that it is easy to read and to port.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "EVENT_HEADER",
    "LEGACY_SIGNATURE_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookVerificationError",
    "sign",
    "verify",
]

TIMESTAMP_HEADER = "X-Alignd-Timestamp"
SIGNATURE_HEADER = "X-Alignd-Signature-V1"
EVENT_HEADER = "X-Alignd-Event"
#: The signature of earlier releases, ``sha256=<HMAC of the body>``: no timestamp, so a replay passes it. Sent only
#: with ``webhook_legacy_signature``; :func:`verify` ignores it.
LEGACY_SIGNATURE_HEADER = "X-Alignd-Signature"
#: How far a timestamp may be from the receiver's clock: retries are signed afresh, so this covers clock skew and
#: transit, not the backoff.
DEFAULT_TOLERANCE_S = 300.0


class WebhookVerificationError(ValueError):
    """The request is not a fresh, intact webhook from an alignd holding the secret; the message says why."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Alignd-Signature-V1`` value of ``body`` sent at ``timestamp`` (Unix seconds)."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(body: bytes, headers: Mapping[str, str], secret: str | Sequence[str], *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> None:
    """Raise :class:`WebhookVerificationError` unless ``body`` carries a valid signature by ``secret`` (or by one
    of several, while rotating it) made within ``tolerance_s`` seconds of ``now`` (default: this clock).

    ``body`` must be the raw bytes received; ``headers`` is any mapping of the request's headers (names in any
    case). The signatures are compared in constant time."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets or not all(secrets):
        raise ValueError("verify needs the webhook secret")
    by_name = {name.lower(): value for name, value in headers.items()}
    raw_timestamp = by_name.get(TIMESTAMP_HEADER.lower(), "").strip()
    if not raw_timestamp:
        raise WebhookVerificationError(f"no {TIMESTAMP_HEADER} header: not signed by a current alignd")
    if not raw_timestamp.isdigit():
        raise WebhookVerificationError(f"{TIMESTAMP_HEADER} {raw_timestamp[:32]!r} is not a Unix time")
    timestamp = int(raw_timestamp)
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        when = "old" if age > 0 else "in the future"
        raise WebhookVerificationError(f"the timestamp is {abs(age):.0f} s {when}, beyond the {tolerance_s:.0f} s "
                                       "tolerance: a replayed request, or a clock to set right")
    presented = by_name.get(SIGNATURE_HEADER.lower(), "").strip()
    if not presented:
        raise WebhookVerificationError(f"no {SIGNATURE_HEADER} header")
    if not any(hmac.compare_digest(presented.encode(), sign(s, body, timestamp).encode()) for s in secrets):
        raise WebhookVerificationError("the signature does not match: another secret, or an altered body or "
                                       "timestamp")
