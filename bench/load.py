"""Load on a server and the figures it gives: closed-loop clients, chat requests, percentiles, tables, the docs page.

The scripts in ``bench/`` import it as ``bench.load``; run as ``python bench/<name>.py`` they first put the repository
root on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

DOC_INTRO = (
    "# Benchmarks\n\n"
    "Figures printed by the scripts in `bench/`, with the machine and the command that produced them. "
    "Rerun a script on your own hardware before drawing conclusions: on small CPU machines the numbers move "
    "with whatever else is running.\n"
)


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it."""

    ok: bool
    started_at: float
    """``time.perf_counter()`` when it was sent."""
    latency_s: float
    tokens: int = 0
    ttft_s: float | None = None
    error: str | None = None
    fingerprint: str | None = None
    """The reply's ``system_fingerprint``: on alignd, the policy version that wrote it."""

    @property
    def finished_at(self) -> float:
        """``time.perf_counter()`` when the answer was in."""
        return self.started_at + self.latency_s


async def closed_loop(concurrency: int, send: Callable[[int], Awaitable[RequestResult]], *,
                      keep_going: Callable[[int], bool],
                      results: list[RequestResult] | None = None) -> list[RequestResult]:
    """``concurrency`` clients, each sending its next request as soon as its previous one is answered.

    ``send(i)`` sends the ``i``-th request; a client sends another while ``keep_going(requests sent so far)``.
    Answers are appended to ``results`` (to watch a running load from outside) in the order they come; returned.
    """
    results = [] if results is None else results
    issued = 0

    async def client() -> None:
        nonlocal issued
        while keep_going(issued):
            index = issued
            issued += 1
            results.append(await send(index))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# --- requests ------------------------------------------------------------------------------------------------------


async def post_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one non-streaming chat request; tokens from ``usage``."""
    started = time.perf_counter()
    try:
        response = await client.post(url, json=body)
        latency = time.perf_counter() - started
        if response.status_code != 200:
            return RequestResult(False, started, latency, error=f"HTTP {response.status_code}: {response.text[:200]}")
        reply = msgspec.json.decode(response.content)
        usage = reply.get("usage") or {}
        return RequestResult(True, started, latency, tokens=int(usage.get("completion_tokens", 0)),
                             fingerprint=reply.get("system_fingerprint"))
    except (httpx.HTTPError, msgspec.DecodeError, ValueError) as e:
        return RequestResult(False, started, time.perf_counter() - started, error=f"{type(e).__name__}: {e}")


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one streaming chat request; TTFT at the first non-empty content delta, tokens from the usage chunk."""
    started = time.perf_counter()
    ttft: float | None = None
    fingerprint: str | None = None
    tokens = deltas = 0
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(False, started, time.perf_counter() - started,
                                     error=f"HTTP {response.status_code}: {text[:200]}")
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    event = msgspec.json.decode(data)
                    if "error" in event:
                        return RequestResult(False, started, time.perf_counter() - started,
                                             error=f"error event: {str(event['error'])[:200]}")
                    fingerprint = fingerprint or event.get("system_fingerprint")
                    for choice in event.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            deltas += 1
                            if ttft is None:
                                ttft = time.perf_counter() - started
                    if event.get("usage"):
                        tokens = int(event["usage"].get("completion_tokens", 0))
        latency = time.perf_counter() - started
        if not done:
            return RequestResult(False, started, latency, error="stream ended without [DONE]")
        return RequestResult(True, started, latency, tokens=tokens or deltas, ttft_s=ttft, fingerprint=fingerprint)
    except (httpx.HTTPError, msgspec.DecodeError, ValueError) as e:
        return RequestResult(False, started, time.perf_counter() - started, error=f"{type(e).__name__}: {e}")


class RawHTTPClient:
    """Keep-alive HTTP/1.1 connections spoken over asyncio streams, one per request in flight.

    For loads where the client must take as little of the machine's CPU as possible from the server (httpx costs
    several times more per request). Bodies are JSON; answers must carry a Content-Length.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, payload: bytes) -> int:
        """POST ``payload`` to ``path``; the status code (the body is read and dropped)."""
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        # The real host and port: the server refuses a Host header it does not serve (--allowed-hosts).
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        self._idle.append((reader, writer))
        return int(head[9:12])

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


# --- tables --------------------------------------------------------------------------------------------------------


class TextTable:
    """Fixed-width columns for the terminal, printed a row at a time as results come in."""

    def __init__(self, columns: Sequence[tuple[str, int]], sep: str = "") -> None:
        """``columns``: a title and a width each; a negative width aligns the column to the left."""
        self.columns, self.sep = columns, sep

    def row(self, *cells: str) -> str:
        """The cells, each padded to its column (fewer cells than columns leave the last ones out)."""
        return self.sep.join(f"{cell:<{-width}}" if width < 0 else f"{cell:>{width}}"
                             for cell, (_, width) in zip(cells, self.columns, strict=False))

    def header(self) -> str:
        return self.row(*(title for title, _ in self.columns))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, title: str, section: str) -> None:
    """Replace (or append) the section headed ``title`` of a Markdown file, keeping every other section."""
    text = path.read_text() if path.exists() else DOC_INTRO
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        body = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body.rstrip("\n") + "\n")
