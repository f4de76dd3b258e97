"""Request bodies: read with a size limit (an OpenAI-shaped 413 before reading one that says it is too large)."""

from __future__ import annotations

from typing import Any

from litestar import Request

from alignd.errors import PayloadTooLarge


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The body, refusing (413) one over ``limit`` bytes before reading it when Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit}.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
