"""The trainer process's side: the spawn target of a run, and its end of the pipe to the server.

Messages (the server's side is :mod:`alignd.trainer.supervisor`):

- ``("progress", phase, progress, metrics)``: the server writes it to the run's row and to /metrics;
- ``("call", n, method, payload)`` → ``("reply", n, ok, value)``: requests to the server; ``rollouts`` generates
  replies with the serving engine (the adapter loaded under a reserved version users cannot reach);
- ``("result", RunResult)`` or ``("error", message, traceback)``: the outcome.

With ``--trainer-processes N`` this process is rank 0 of N and starts the others (:mod:`alignd.trainer.distributed`);
a rank that fails fails the run: rank 0 reports why and exits, and the others die with it.

The process dies with the server: on Linux the kernel SIGKILLs it when the server's thread that started it ends
(``PR_SET_PDEATHSIG``; the supervisor starts runs from its event loop's thread, which lives as long as the server),
and on every platform a watcher thread SIGKILLs it within a second of the server's pid going away, so a server killed
with SIGKILL never leaves a trainer holding the GPU.

Light to import (torch and the training code load inside :func:`child_main`): the server imports it for the name.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from alignd.faults import failpoint
from alignd.trainer.job import RunJob

__all__ = ["RunLink", "child_main"]


class RunLink:
    """The trainer process's end of the pipe: progress reports and blocking calls to the server."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._calls = itertools.count()
        self._sending = threading.Lock()  # the ranks' watcher thread may send the outcome too

    def send(self, message: tuple[Any, ...]) -> None:
        with self._sending:
            self.conn.send(message)

    def report(self, phase: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        failpoint(f"trainer:{phase}")  # tests: a crash as the run enters this phase
        self.send(("progress", phase, progress, metrics or {}))

    def call(self, method: str, payload: dict[str, Any]) -> Any:
        n = next(self._calls)
        self.send(("call", n, method, payload))
        kind, reply_n, ok, value = self.conn.recv()
        if kind != "reply" or reply_n != n:
            raise RuntimeError(f"unexpected message from the server: {kind} {reply_n}")
        if not ok:
            raise RuntimeError(f"the server could not {method}: {value}")
        return value


PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 0.5


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when ``parent_pid`` (the server) goes away: at once through the kernel on Linux, and
    within ``PARENT_POLL_S`` through a watcher thread everywhere (an exited parent's children are re-parented)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                logging.getLogger(__name__).warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError):
            pass  # the watcher below still holds
    if os.getppid() != parent_pid:  # the server died before the kernel was told
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="alignd-parent-watch", daemon=True).start()


def child_main(conn: Connection, job: RunJob, parent_pid: int | None = None) -> None:
    """Entry point of the trainer process: run, then send the result or the error. ``parent_pid``: the server's."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s trainer: %(message)s")
    from alignd.engine.gpu import hide_triton_without_gpu

    hide_triton_without_gpu()  # before torch's dynamo (through transformers) would import it
    import torch

    from alignd.trainer.run import run_training

    torch.set_num_threads(max(1, job.threads))
    link = RunLink(conn)
    workers = None
    try:
        if job.config.processes > 1:
            workers = _start_ranks(job, link)
        result = run_training(job, link, link)
        assert result is not None  # rank 0's
        if workers is not None:
            workers.close()  # they left after policy optimisation; a failure before that would have ended this one
        link.send(("result", dataclasses.asdict(result)))
    except BaseException as e:
        # A rank that died makes rank 0's collective fail too: its death is the run's error (unless it failed with
        # rank 0's own error, as every rank does on the same data).
        message = f"{type(e).__name__}: {e}"
        reason = workers.failure(wait_s=2.0) if workers is not None else None
        link.send(("error", message if reason is None or reason.endswith(message) else reason,
                   traceback.format_exc()))
        if workers is not None:
            workers.close(grace_s=0.0)  # ranks still waiting on rank 0 in a collective
    finally:
        if workers is not None:
            workers.close()
        conn.close()


def _start_ranks(job: RunJob, link: RunLink) -> Any:
    """Start ranks 1..N-1 and join the process group as rank 0; a rank that fails ends this process (and so the
    others) at once, its reason sent as the run's error."""
    from alignd.trainer import distributed

    port = distributed.free_port()
    workers = distributed.start_workers(job, job.config.processes, port)

    def fail(reason: str) -> None:
        logging.getLogger(__name__).error("%s: the run fails", reason)
        try:
            link.send(("error", reason, ""))
            link.conn.close()
        finally:
            os._exit(1)

    workers.watch(fail)  # before joining: a rank that dies while starting must not leave rank 0 waiting
    distributed.init_ranks(job, 0, job.config.processes, port)
    return workers


if __name__ == "__main__":  # a rank > 0 (alignd.trainer.distributed.start_workers): rank world port parent-pid error-fd
    import pickle

    from alignd.engine.gpu import hide_triton_without_gpu

    hide_triton_without_gpu()  # before torch, as in child_main
    from alignd.trainer.distributed import worker_main

    worker_main(pickle.loads(sys.stdin.buffer.read()), *map(int, sys.argv[1:6]))
