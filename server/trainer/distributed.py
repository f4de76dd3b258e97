"""One run as N processes (``--trainer-processes``): data parallelism over torch.distributed, set up by accelerate.

Rank 0 is the process the server started (:mod:`alignd.trainer.child`): it keeps the pipe to the server (progress,
rollouts, the result) and starts ranks 1..N-1 as its own children, which die with it as it dies with the server
(``PR_SET_PDEATHSIG`` plus a watcher thread, as rank 0 itself). Each rank loads the same frozen base and adapters
on its own device (``cuda:<rank>`` under NCCL, the CPU under gloo: accelerate's :class:`PartialState` picks the
backend and device from the environment a launcher would set). Rank 0 reads the data and asks the server for
rollouts; the other ranks get both by broadcast, so every rank holds the same batch.

The update loops stay as they are, with three hooks:

- :func:`shard`: the rows (or feedback units) of a minibatch this rank takes its forward and backward passes on;
  each rank weighs its part by its share of the *whole* minibatch (tokens, pairs), so that
- :func:`all_reduce_grads` summing the ranks' gradients before the clip and the optimizer step gives every rank the
  whole minibatch's gradient (and its summed figures): the same step on every rank, the step one process would take;
- :func:`agreed`: a decision that ends a loop (KL past the budget, the time limit) is rank 0's, so ranks never part.

Gradients are all-reduced by hand rather than through ``Accelerator.prepare``'s DDP wrapper: DDP fixes the set of
trainable parameters when it wraps the model, and the stack switches it with the role (reward model, judge,
policy with its critic) on one PEFT model. With one process every hook returns at once (one ``is_initialized``
check): the single-process path is unchanged.

After policy optimisation the other ranks are done; rank 0 runs the gate alone and saves the candidate (every file
a run writes is rank 0's).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from alignd.faults import failpoint
from alignd.trainer.job import RunJob
from alignd.trainer.models import ModelStack
from alignd.trainer.rollout import Rollout, RolloutBackend, Sampling

__all__ = [
    "SharedRollouts",
    "Workers",
    "agreed",
    "all_reduce_grads",
    "describe",
    "from_main",
    "init_ranks",
    "is_main",
    "rank",
    "same_start",
    "shard",
    "shared_rollouts",
    "start_workers",
    "world",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


# --- where this process stands --------------------------------------------------------------------------------


def world() -> int:
    """Processes in this run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0: the one that talks to the server)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def describe() -> dict[str, Any]:
    """The run's figures on how it ran: processes, backend (gloo, nccl) and strategy (None with one process)."""
    if world() == 1:
        return {"processes": 1, "backend": None, "strategy": None}
    return {"processes": world(), "backend": str(dist.get_backend()), "strategy": "ddp"}


# --- the update loops' hooks ----------------------------------------------------------------------------------


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's part of a minibatch's rows (every ``world``-th, from ``rank``); all of them with one process.
    A rank may get none (a minibatch smaller than the world): it still takes part in :func:`all_reduce_grads`."""
    n = world()
    return items if n == 1 else items[rank()::n]


def all_reduce_grads(params: Iterable[torch.nn.Parameter], figures: dict[str, float] | None = None
                     ) -> dict[str, float]:
    """Sum the ranks' gradients of ``params`` (and their ``figures``, weighted shares of the minibatch's means)
    in place, one flat buffer per dtype; a parameter a rank has no gradient for counts as zeros. Returns the summed
    figures. With one process: nothing to do."""
    figures = dict(figures or {})
    if world() == 1:
        return figures
    failpoint(f"trainer:rank{rank()}:sync")  # tests: a rank killed mid-run
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)  # type: ignore[union-attr]
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    if figures:
        keys = sorted(figures)
        device = params[0].device if params else torch.device("cpu")
        values = torch.tensor([figures[k] for k in keys], dtype=torch.float64, device=device)  # (F,)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        figures = dict(zip(keys, values.tolist(), strict=True))
    return figures


def same_start(params: Iterable[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values of ``params`` (what DDP does when it wraps a model): the ranks' steps are
    then the same from the first one, whatever each rank's random state."""
    if world() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def agreed(decision: bool) -> bool:
    """Rank 0's ``decision`` on every rank (a loop that ends on a measured figure or the clock ends on all at
    once)."""
    if world() == 1:
        return decision
    return bool(from_main(lambda: decision))


def from_main(make: Callable[[], T]) -> T:
    """``make()`` on rank 0, its value (picklable) on every rank."""
    if world() == 1:
        return make()
    box: list[Any] = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SharedRollouts:
    """Rollouts generated once, on rank 0 (through the server), and broadcast to every rank."""

    def __init__(self, backend: RolloutBackend | None) -> None:
        self.backend = backend
        """Rank 0's backend; None on the other ranks."""

    def generate(self, stack: ModelStack, prompts: Sequence[list[int]], adapter: str | None, sampling: Sampling,
                 seeds: Sequence[int] | None = None) -> list[Rollout]:
        def make() -> list[Rollout]:
            assert self.backend is not None
            return self.backend.generate(stack, prompts, adapter, sampling, seeds)

        return from_main(make)


def shared_rollouts(backend: RolloutBackend | None) -> RolloutBackend:
    """``backend`` itself with one process, else :class:`SharedRollouts` over it."""
    if world() == 1:
        assert backend is not None
        return backend
    return SharedRollouts(backend)


# --- starting the ranks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankInfo:
    """What one rank's process group looks like, for the run's figures."""

    processes: int
    backend: str
    device: str


def init_ranks(job: RunJob, rank_: int, world_: int, port: int) -> RankInfo:
    """Join the run's process group as ``rank_`` of ``world_`` through accelerate's :class:`PartialState` (gloo on
    the CPU, NCCL on CUDA, one card per rank), and point the job at this rank's device and share of the threads."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_), WORLD_SIZE=str(world_),
                      LOCAL_RANK=str(rank_), LOCAL_WORLD_SIZE=str(world_))
    from accelerate import PartialState

    cpu = job.config.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, backend="gloo" if cpu else None)
    if state.num_processes != world_:
        raise RuntimeError(f"accelerate set up {state.num_processes} processes, not {world_} "
                           f"({state.distributed_type})")
    job.config.device = str(state.device)
    job.threads = max(1, job.threads // world_)
    torch.set_num_threads(job.threads)
    return RankInfo(processes=world_, backend=str(state.backend), device=str(state.device))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workers:
    """Ranks 1..N-1 of a run, children of rank 0, each with a pipe that carries its error if it fails."""

    def __init__(self, processes: list[Any], conns: list[Connection]) -> None:
        self.processes = processes
        self.conns = conns
        self.done = threading.Event()
        """Set once rank 0 has its outcome: a rank ending after that is no failure."""

    def failure(self, wait_s: float = 0.0) -> str | None:
        """Why a rank ended before the run did (its error, or its exit code / signal); None while all are well.
        ``wait_s``: give a rank that is ending this long to end (rank 0 saw a collective fail)."""
        deadline = time.monotonic() + wait_s
        for index, process in enumerate(self.processes, start=1):
            if wait_s > 0:
                process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode not in (None, 0):
                error = ""
                try:
                    if self.conns[index - 1].poll():
                        error = f": {self.conns[index - 1].recv()}"
                except (EOFError, OSError):
                    pass
                code = process.exitcode
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                return f"trainer rank {index} of {len(self.processes) + 1} ended ({how}){error}"
        return None

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call ``on_failure(reason)`` from a thread when a rank ends with an error before the run is done."""
        sentinels = [p.sentinel for p in self.processes]

        def run() -> None:
            from multiprocessing.connection import wait

            pending = list(sentinels)
            while pending and not self.done.is_set():
                for ready in wait(pending, timeout=0.5):
                    pending.remove(ready)  # type: ignore[arg-type]
                reason = self.failure()
                if reason is not None and not self.done.is_set():
                    on_failure(reason)
                    return

        threading.Thread(target=run, name="alignd-rank-watch", daemon=True).start()

    def close(self, grace_s: float = 10.0) -> None:
        """Wait up to ``grace_s`` for the ranks to end (they leave after policy optimisation), killing any that does
        not."""
        self.done.set()
        for process in self.processes:
            process.join(grace_s)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in self.conns:
            conn.close()


def start_workers(job: RunJob, world_: int, port: int) -> Workers:
    """Spawn ranks 1..``world_``-1 (fresh interpreters: no CUDA state inherited), each dying with this process."""
    ctx = multiprocessing.get_context("spawn")
    processes, conns = [], []
    for r in range(1, world_):
        ours, theirs = ctx.Pipe(duplex=False)
        process = ctx.Process(target=worker_main, args=(theirs, job, r, world_, port, os.getpid()),
                              name=f"alignd-trainer-{job.run_id}-rank{r}", daemon=True)
        process.start()
        theirs.close()
        processes.append(process)
        conns.append(ours)
    return Workers(processes, conns)


class _Silent:
    """The other ranks' reporter: only rank 0 reports."""

    def report(self, phase: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        pass


def worker_main(conn: Connection, job: RunJob, rank_: int, world_: int, port: int, parent_pid: int) -> None:
    """Entry point of rank ``rank_`` > 0: train in step with rank 0 until policy optimisation ends. A failure is
    sent to rank 0 (which fails the run) before the process exits with code 1."""
    from alignd.trainer.child import die_with_parent

    die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s trainer rank {rank_}: %(message)s")
    from alignd.engine.gpu import hide_triton_without_gpu

    hide_triton_without_gpu()
    from alignd.trainer.run import run_training

    try:
        init_ranks(job, rank_, world_, port)
        run_training(job, _Silent(), None)
    except BaseException as e:
        log.error("rank %d failed:\n%s", rank_, traceback.format_exc())
        try:
            conn.send(f"{type(e).__name__}: {e}")
        except OSError:
            pass
        conn.close()
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
