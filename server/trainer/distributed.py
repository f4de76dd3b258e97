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

No-grad passes over a batch of rollouts (log-probs, reference, reward and the critic's features) go through
:func:`map_rows`: each rank passes a block of rows, and every rank gets all of them back.

Gradients are all-reduced by hand rather than through ``Accelerator.prepare``'s DDP wrapper: DDP fixes the set of
trainable parameters when it wraps the model, and the stack switches it with the role (reward model, judge,
policy with its critic) on one PEFT model. With one process every hook returns at once (one ``is_initialized``
check): the single-process path is unchanged.

After policy optimisation every rank leaves the process group (:func:`leave`) and the other ranks exit; rank 0 runs
the gate as a single process would and saves the candidate (every file a run writes is rank 0's).

With ``--trainer-distributed fsdp`` (:func:`sharded`) the frozen base is sharded over the ranks with FSDP2
(:func:`shard_base`: ``fully_shard`` on each decoder layer, the embeddings, the backbone and the model), for a base
that does not fit one device. Every forward pass then all-gathers each layer's shards, so the ranks must run the same
passes in the same order: every rank takes every row (``shard`` and ``map_rows`` give all of them) and computes the
same gradients (:func:`all_reduce_grads` gives every rank rank 0's instead of a sum). The LoRA adapters and heads stay
whole on every rank (FSDP ignores them: a few MB that PEFT adds, switches and drops as before, which FSDP's sharded
parameters could not be), so saving one needs no gathering. The gate's passes need every rank too: the ranks leave
after it (:func:`leaves_before_gate`). Memory per rank falls to about 1/N of the base; time does not (every rank does
the whole work).

For a new objective (online DPO, KTO): take the minibatch's total (tokens, pairs) before ``rows = shard(rows)``, weigh
each micro-batch's loss by its share of that total, call ``figures = all_reduce_grads(params, figures)`` between the
backward passes and the clip, ``same_start(params)`` once after making the optimizer, and wrap a loop's early stop in
:func:`agreed`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    "leave",
    "leaves_before_gate",
    "map_rows",
    "rank",
    "same_start",
    "shard",
    "shard_base",
    "sharded",
    "shared_rollouts",
    "start_workers",
    "world",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_strategy = "ddp"
"""This process's ``--trainer-distributed`` (:func:`init_ranks` sets it from the run's config)."""


# --- where this process stands --------------------------------------------------------------------------------


def world() -> int:
    """Processes in this run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0: the one that talks to the server)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def sharded() -> bool:
    """The base is sharded over several ranks (``fsdp``): every rank runs every pass (see the module's text)."""
    return _strategy == "fsdp" and world() > 1


def leaves_before_gate() -> bool:
    """The ranks leave after policy optimisation (``ddp``: rank 0 holds the whole base and gates alone), not after
    the gate's passes (``fsdp``: they need every rank's shards)."""
    return not sharded()


def describe() -> dict[str, Any]:
    """The run's figures on how it ran: processes, backend (gloo, nccl) and strategy (None with one process)."""
    if world() == 1:
        return {"processes": 1, "backend": None, "strategy": None}
    return {"processes": world(), "backend": str(dist.get_backend()), "strategy": _strategy}


def shard_base(stack: ModelStack, device: torch.device) -> None:
    """FSDP2 over the frozen base of ``stack`` when :func:`sharded` (else nothing): ``fully_shard`` on each decoder
    layer, the input and output embeddings (one group when tied, as FSDP requires of a shared weight), the backbone
    (its final norm: :meth:`ModelStack.hidden_states` calls it directly) and the causal LM. Adapter and head weights
    are left whole on every rank (``ignored_params``). The stack was loaded on the CPU (``load_stack(..., on_cpu=)``):
    each rank's shards, the adapters and the heads go to ``device``, the whole base never does."""
    if not sharded():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = stack.causal_lm
    backbone = getattr(lm, lm.base_model_prefix)
    ignored = {p for name, p in stack.model.named_parameters() if "lora_" in name}
    options = {"mesh": init_device_mesh(device.type, (world(),)), "ignored_params": ignored}
    for layer in backbone.layers:
        fully_shard(layer, **options)
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is not None and head.weight is embeddings.weight:
        fully_shard([embeddings, head], **options)
    else:
        fully_shard(embeddings, **options)
        if head is not None:
            fully_shard(head, **options)
    fully_shard(backbone, **options)
    fully_shard(lm, **options)
    with torch.no_grad():
        for p in ignored:
            p.data = p.data.to(device)
    stack.heads.to(device)
    stack.device = device
    # FSDP makes the module of the first pass its root: a pass through the backbone alone first (the reward model's
    # hidden states) would make it the root, and the LM's own passes then fail ("already lazily initialized").
    with torch.no_grad():
        lm(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)


# --- the update loops' hooks ----------------------------------------------------------------------------------


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's part of a minibatch's rows (every ``world``-th, from ``rank``); all of them with one process or a
    sharded base (:func:`sharded`). A rank may get none (a minibatch smaller than the world): it still takes part in
    :func:`all_reduce_grads`."""
    n = world()
    return items if n == 1 or sharded() else items[rank()::n]


def all_reduce_grads(params: Iterable[torch.nn.Parameter], figures: dict[str, float] | None = None
                     ) -> dict[str, float]:
    """Sum the ranks' gradients of ``params`` (and their ``figures``, weighted shares of the minibatch's means)
    in place, one flat buffer per dtype; a parameter a rank has no gradient for counts as zeros. Returns the summed
    figures. With one process: nothing to do. With a sharded base every rank computed the whole minibatch's
    gradients and figures: rank 0's gradients go to all (apart from float noise they are the same)."""
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
        if sharded():  # every rank took the whole minibatch: rank 0's gradients, so the ranks' adapters never drift
            dist.broadcast(flat, src=0)
        else:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    if figures and not sharded():
        keys = sorted(figures)
        device = params[0].device if params else torch.device("cpu")
        values = torch.tensor([figures[k] for k in keys], dtype=torch.float64, device=device)  # (F,)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        figures = dict(zip(keys, values.tolist(), strict=True))
    return figures


def map_rows(fn: Callable[[int, int], tuple[Tensor, ...]], n: int) -> tuple[Tensor, ...]:
    """``fn(start, stop)``: no-grad passes over rows ``start:stop`` of a batch of ``n``, returning tensors with one
    row each; with several processes every rank runs its block of rows (the blocks differ in size by one at most) and
    every rank gets all the rows back in order. ``fn(0, n)`` with one process, fewer rows than ranks, or a sharded
    base (the ranks' passes must match one for one)."""
    w = world()
    if w == 1 or n < w or sharded():
        return fn(0, n)
    sizes = [n // w + (1 if r < n % w else 0) for r in range(w)]
    start = sum(sizes[: rank()])
    mine = fn(start, start + sizes[rank()])
    most, out = sizes[0], []
    widen = dist.get_backend() == "gloo"  # gloo's all-gather is surest in float32: half-precision rows go as that
    for part in mine:
        wire = part.float() if widen and part.dtype in (torch.bfloat16, torch.float16) else part
        padded = torch.zeros((most, *wire.shape[1:]), dtype=wire.dtype, device=wire.device)  # (most, ...)
        padded[: len(wire)] = wire
        blocks = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(blocks, padded)
        out.append(torch.cat([block[:size] for block, size in zip(blocks, sizes, strict=True)]).to(part.dtype))
    return tuple(out)


def leave() -> None:
    """End the run's parallel part (after policy optimisation): every rank leaves the process group, so that what
    rank 0 does alone afterwards (the gate) runs as one process would, hooks and all."""
    if world() > 1:
        dist.barrier()
        dist.destroy_process_group()


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
    global _strategy
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_), WORLD_SIZE=str(world_),
                      LOCAL_RANK=str(rank_), LOCAL_WORLD_SIZE=str(world_))
    _strategy = job.config.distributed
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
    """Ranks 1..N-1 of a run, child processes of rank 0, each with a pipe that carries its error if it fails."""

    def __init__(self, processes: list[subprocess.Popen[bytes]], errors: list[int]) -> None:
        self.processes = processes
        self.errors = errors
        """The read ends of the ranks' error pipes."""
        self.done = threading.Event()
        """Set once rank 0 has its outcome: a rank ending after that is no failure."""

    def failure(self, wait_s: float = 0.0) -> str | None:
        """Why a rank ended before the run did (its error, or its exit code / signal); None while all are well.
        ``wait_s``: give a rank that is ending this long to end (rank 0 saw a collective fail)."""
        deadline = time.monotonic() + wait_s
        for index, process in enumerate(self.processes, start=1):
            try:
                code = process.wait(max(0.0, deadline - time.monotonic())) if wait_s > 0 else process.poll()
            except subprocess.TimeoutExpired:
                code = None
            if code not in (None, 0):
                error = _read_error(self.errors[index - 1])
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"  # type: ignore[operator]
                return f"trainer rank {index} of {len(self.processes) + 1} ended ({how}){': ' + error if error else ''}"
        return None

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call ``on_failure(reason)`` from a thread when a rank ends with an error before the run is done."""

        def run() -> None:
            while not self.done.wait(0.5):
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
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for fd in self.errors:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.errors = []


def _read_error(fd: int) -> str:
    try:
        os.set_blocking(fd, False)
        return os.read(fd, 65536).decode(errors="replace").strip()
    except (OSError, IndexError):
        return ""


def start_workers(job: RunJob, world_: int, port: int) -> Workers:
    """Start ranks 1..``world_``-1 as fresh interpreters (no CUDA state inherited; ``subprocess``, since rank 0 is a
    daemonic multiprocessing child, which may have none of its own), each dying with this process; the job goes over
    stdin."""
    processes, errors = [], []
    payload = pickle.dumps(job)
    for r in range(1, world_):
        read, write = os.pipe()
        process = subprocess.Popen(
            [sys.executable, "-m", "alignd.trainer.child", str(r), str(world_), str(port), str(os.getpid()),
             str(write)], stdin=subprocess.PIPE, pass_fds=(write,))
        os.close(write)
        assert process.stdin is not None
        process.stdin.write(payload)
        process.stdin.close()
        processes.append(process)
        errors.append(read)
    return Workers(processes, errors)


class _Silent:
    """The other ranks' reporter: only rank 0 reports."""

    def report(self, phase: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        pass


def worker_main(job: RunJob, rank_: int, world_: int, port: int, parent_pid: int, error_fd: int) -> None:
    """Entry point of rank ``rank_`` > 0: train in step with rank 0 until policy optimisation ends. A failure is
    written to ``error_fd`` (rank 0 fails the run with it) before the process exits with code 1."""
    from alignd.trainer.child import die_with_parent

    die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s trainer rank {rank_}: %(message)s")
    from alignd.trainer.run import run_training

    try:
        init_ranks(job, rank_, world_, port)
        run_training(job, _Silent(), None)
    except BaseException as e:
        log.error("rank %d failed:\n%s", rank_, traceback.format_exc())
        with contextlib.suppress(OSError):
            os.write(error_fd, f"{type(e).__name__}: {e}".encode()[:60000])
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

