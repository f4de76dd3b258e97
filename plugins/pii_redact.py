"""Masks e-mail addresses and phone numbers: in a feedback event's comment and free-text fields (such as an edit's
``text``) before anything else sees or stores them, and in every text that leaves the server (prompts, replies,
comments in the exports, ``GET /v1/feedback`` and what sinks such as the JSONL file and the webhook receive).

Heuristics, not a guarantee: an e-mail is ``name@domain.tld``; a phone number is 9 to 15 digits, optionally with
``+``, spaces, dots, dashes and parentheses between them (ISO dates are left alone).
"""

from __future__ import annotations

import re

from alignd import Feedback, hookimpl

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{6,}\d(?![\w])")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _phone(match: re.Match[str]) -> str:
    candidate = match.group(0)
    digits = sum(ch.isdigit() for ch in candidate)
    if not 9 <= digits <= 15 or _ISO_DATE.match(candidate) or "\n" in candidate:
        return candidate
    return "[phone]"


def redact(text: str) -> str:
    """``text`` with e-mail addresses as ``[email]`` and phone numbers as ``[phone]``."""
    return PHONE.sub(_phone, EMAIL.sub("[email]", text))


@hookimpl
def prepare_feedback(feedback: Feedback) -> None:
    if feedback.comment:
        feedback.comment = redact(feedback.comment)
    payload = feedback.payload
    for name in getattr(payload, "__struct_fields__", ()):
        value = getattr(payload, name)
        if isinstance(value, str):
            setattr(payload, name, redact(value))


@hookimpl
def redact_text(text: str) -> str:
    return redact(text)
