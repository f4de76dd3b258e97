"""Start and stop a throwaway PostgreSQL cluster for tests and benchmarks.

The cluster lives in a temporary directory, listens only on 127.0.0.1 on a
free port (its unix socket also in that directory), and accepts one user with
a password (scram-sha-256). PostgreSQL refuses to run as root, so when we are
root the server binaries run as the ``postgres`` system user (created if
missing) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PostgresServer", "PostgresUnavailable", "find_pg_bindir", "start_postgres"]

_USER = "alignd"
_PG_SYSTEM_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started (the message says why)."""


def find_pg_bindir() -> Path | None:
    """The directory holding ``initdb``/``postgres``/``pg_ctl``: newest under /usr/lib/postgresql, else PATH."""
    candidates = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: _version_key(d.parent.name),
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "pg_isready")):
            return bindir
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    """Prefix ``argv`` so that it runs as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", _PG_SYSTEM_USER, "--", *argv]


def _ensure_system_user() -> None:
    """As root, make sure the ``postgres`` system user exists (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return
    if subprocess.run(["id", "-u", _PG_SYSTEM_USER], capture_output=True).returncode == 0:
        return
    useradd = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_SYSTEM_USER],
        capture_output=True,
        text=True,
    )
    if useradd.returncode != 0:
        raise PostgresUnavailable(f"cannot create the {_PG_SYSTEM_USER!r} system user: {useradd.stderr.strip()}")


@dataclass
class PostgresServer:
    """A running throwaway cluster; :meth:`stop` shuts it down and deletes its files."""

    bindir: Path
    base_dir: Path
    port: int
    password: str
    log_file: Path
    stopped: bool = field(default=False)
    start_options: str = ""
    """The ``pg_ctl -o`` options it was started with (:meth:`resume` starts it with them again)."""

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "socket"

    @property
    def url(self) -> str:
        """``postgresql://`` URL of the ``postgres`` maintenance database, with user and password."""
        return f"postgresql://{_USER}:{self.password}@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        """The URL of another database on this server."""
        return f"postgresql://{_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def halt(self, mode: str = "fast") -> None:
        """Shut the server down (``mode``: smart, fast or immediate) and keep its files: a database outage that
        :meth:`resume` ends, on the same port."""
        _run(_as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]),
             "pg_ctl stop", 60)

    def resume(self, timeout: float = 60.0) -> None:
        """Start a server that :meth:`halt` stopped, and wait until it accepts connections."""
        pg_ctl = [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                  "-o", self.start_options, "-w", "-t", str(int(timeout)), "start"]
        _run(_as_server_user(pg_ctl), "pg_ctl start", timeout + 10)
        _wait_ready(self, timeout)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        try:
            subprocess.run(
                _as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _run(argv: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresUnavailable(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")


def _wait_ready(server: PostgresServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    argv = [str(server.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port), "-d", "postgres"]
    while True:
        if subprocess.run(argv, capture_output=True).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise PostgresUnavailable(f"PostgreSQL on port {server.port} not ready after {timeout:.0f}s")
        time.sleep(0.1)


def start_postgres(*, settings: dict[str, str] | None = None, timeout: float = 60.0) -> PostgresServer:
    """Create a cluster in a temporary directory, start it, and wait until it accepts connections.

    ``settings`` are extra server settings (``-c name=value``), e.g. ``{"fsync": "off"}`` for
    fast tests. Raises :class:`PostgresUnavailable` with the reason (and the server log) on failure.
    """
    bindir = find_pg_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under /usr/lib/postgresql/*/bin "
            "or on PATH; install PostgreSQL or set ALIGND_TEST_POSTGRES_URL"
        )
    _ensure_system_user()
    base_dir = Path(tempfile.mkdtemp(prefix="alignd-pg-"))
    server = PostgresServer(bindir, base_dir, _free_port(), secrets.token_hex(12), base_dir / "server.log")
    try:
        server.socket_dir.mkdir()
        pwfile = base_dir / "pwfile"
        pwfile.write_text(server.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(base_dir, _PG_SYSTEM_USER)
            for path in (server.socket_dir, pwfile):
                shutil.chown(path, _PG_SYSTEM_USER)
        initdb = [
            str(bindir / "initdb"),
            "-D",
            str(server.data_dir),
            "--username",
            _USER,
            "--pwfile",
            str(pwfile),
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # a throwaway cluster: durability of initdb's files is irrelevant
        ]
        _run(_as_server_user(initdb), "initdb", timeout)
        pwfile.unlink()
        options = {"listen_addresses": "127.0.0.1", "port": str(server.port)} | dict(settings or {})
        option_args = " ".join(f"-c {name}={value}" for name, value in options.items())
        option_args += f" -k {server.socket_dir}"
        server.start_options = option_args
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(server.data_dir), "-l", str(server.log_file)]
        pg_ctl += ["-o", option_args, "-w", "-t", str(int(timeout)), "start"]
        _run(_as_server_user(pg_ctl), "pg_ctl start", timeout + 10)
        _wait_ready(server, timeout)
    except BaseException as exc:
        log = server.log_tail()
        server.stop()
        if isinstance(exc, PostgresUnavailable):
            raise PostgresUnavailable(f"{exc}\n--- server log ---\n{log}") from exc
        raise
    return server
