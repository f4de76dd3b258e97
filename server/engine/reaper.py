"""The engine's processes die with the server.

vLLM's engine core runs in a process of its own (its workers watch it, and exit with it), but it does not watch the
server: a server killed with SIGKILL (or the OOM killer) leaves it running, holding its memory or GPU. Nothing runs in
a process killed that way, so a small watcher process does it: :func:`start_reaper` starts it once the engine is up,
with the engine's processes (pid and start time, so a reused pid is never hit) on its command line and the read end
of a pipe on its stdin that only the server holds. End of file without the word ``stop`` means the server is gone:
the watcher SIGKILLs those processes and exits. A clean shutdown writes ``stop`` first.

Run as ``python -m alignd.engine.reaper PID:START_TIME ...``; light to import (psutil only).
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

__all__ = ["Reaper", "start_reaper"]

STOP = b"stop"


class Reaper:
    """The server's end: the watcher process and the pipe to it."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def stop(self) -> None:
        """A clean shutdown: the watcher exits without killing anything."""
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(STOP)
            self.process.stdin.close()
            self.process.wait(5)
        except (OSError, subprocess.TimeoutExpired, AssertionError):
            self.process.kill()


def start_reaper(processes: list[psutil.Process]) -> Reaper | None:
    """Watch over ``processes`` (the engine's) for this server; None when there is nothing to watch."""
    targets = []
    for process in processes:
        try:
            targets.append(f"{process.pid}:{process.create_time()!r}")
        except psutil.Error:
            continue
    if not targets:
        return None
    watcher = subprocess.Popen([sys.executable, "-m", "alignd.engine.reaper", *targets], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return Reaper(watcher)


def main(argv: list[str]) -> int:
    said = b""
    with os.fdopen(0, "rb", buffering=0) as pipe:
        while chunk := pipe.read(64):  # blocks until the server writes or its end closes (exit, crash, kill)
            said += chunk
    if said == STOP:
        return 0
    for target in argv:
        pid, _, created = target.partition(":")
        try:
            process = psutil.Process(int(pid))
            if abs(process.create_time() - float(created)) < 1e-3:  # the same process, not a reused pid
                process.kill()
        except (psutil.Error, ValueError):
            continue
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
