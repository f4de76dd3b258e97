"""Appends every accepted feedback event (one JSON line, the ``events`` export shape) to ``jsonl_path``, rotating
by size like ``logging``'s RotatingFileHandler: ``FILE`` → ``FILE.1`` → … → ``FILE.<jsonl_backups>``. Off unless
``jsonl_path`` is set."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from alignd import CompletionRecord, Feedback, PluginContext, Signal, feedback_event, hookimpl

NAME = "jsonl_sink"


class RotatingJsonl:
    """An append-only JSONL file that rotates before it would grow past ``max_bytes``."""

    def __init__(self, path: str | Path, *, max_bytes: int, backups: int) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = self.path.open("ab")
        self._size = self._file.tell()

    def write(self, line: bytes) -> None:
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._file.flush()  # a reader (tail -f, a shipper) sees whole lines
        self._size += len(line)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("ab")
        self._size = 0

    def close(self) -> None:
        self._file.close()


@hookimpl
def startup(context: PluginContext) -> None:
    config = context.settings.plugins
    if config.jsonl_path:
        context.state[NAME] = RotatingJsonl(config.jsonl_path, max_bytes=config.jsonl_max_bytes,
                                            backups=config.jsonl_backups)


@hookimpl
async def on_feedback(feedback: Feedback, completion: CompletionRecord, signal: Signal,
                      context: PluginContext) -> None:
    writer: RotatingJsonl | None = context.state.get(NAME)
    if writer is not None:
        line = msgspec.json.encode(feedback_event(feedback, completion, signal)) + b"\n"
        # Events arrive one at a time (the sink's worker), so lines keep commit order.
        await asyncio.to_thread(writer.write, line)


@hookimpl
def shutdown(context: PluginContext) -> None:
    writer: RotatingJsonl | None = context.state.pop(NAME, None)
    if writer is not None:
        writer.close()
