"""Chat messages as stored requests carry them, made plain for chat templates and training formats."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["plain_messages"]


def plain_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages as plain ``{"role", "content"}`` dicts with text content: content parts joined, and the
    ``developer`` role (OpenAI's newer name for ``system``) as ``system``, which chat templates know. Serving, the
    feedback export and the trainer all render prompts through this one function, so they see the same prompt."""
    plain: list[dict[str, str]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        role = message.get("role")
        plain.append({"role": "system" if role == "developer" else str(role), "content": content or ""})
    return plain
