"""The trainer process's side: the spawn target of a run, and its end of the pipe to the server.

Messages (the server's side is :mod:`alignd.trainer.supervisor`):

- ``("progress", phase, progress, metrics)``: the server writes it to the run's row and to /metrics;
- ``("call", n, method, payload)`` → ``("reply", n, ok, value)``: requests to the server; ``rollouts`` generates
  replies with the serving engine (the adapter loaded under a reserved version users cannot reach);
- ``("result", RunResult)`` or ``("error", message, traceback)``: the outcome.

Light to import (torch and the training code load inside :func:`child_main`): the server imports it for the name.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import traceback
from multiprocessing.connection import Connection
from typing import Any

from alignd.trainer.job import RunJob

__all__ = ["RunLink", "child_main"]


class RunLink:
    """The trainer process's end of the pipe: progress reports and blocking calls to the server."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._calls = itertools.count()

    def report(self, phase: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        self.conn.send(("progress", phase, progress, metrics or {}))

    def call(self, method: str, payload: dict[str, Any]) -> Any:
        n = next(self._calls)
        self.conn.send(("call", n, method, payload))
        kind, reply_n, ok, value = self.conn.recv()
        if kind != "reply" or reply_n != n:
            raise RuntimeError(f"unexpected message from the server: {kind} {reply_n}")
        if not ok:
            raise RuntimeError(f"the server could not {method}: {value}")
        return value


def child_main(conn: Connection, job: RunJob) -> None:
    """Entry point of the trainer process: run, then send the result or the error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s trainer: %(message)s")
    import torch

    from alignd.trainer.run import run_training

    torch.set_num_threads(max(1, job.threads))
    link = RunLink(conn)
    try:
        result = run_training(job, link, link)
        conn.send(("result", dataclasses.asdict(result)))
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()
