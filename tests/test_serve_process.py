"""``alignd serve`` as a real process: SIGTERM while the engine starts leaves no engine process behind; an invalid
configuration fails naming the key. (SIGTERM with a stream and a training run in flight, and the crashes:
``tests/test_process_faults.py``.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 240) -> list[str]:
    """Poll until /ready answers 200; return the /ready statuses seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "alignd serve exited during start"
        try:
            r = httpx.get(f"{url}/ready", timeout=2)
            seen.append(r.json()["status"])
            if r.status_code == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not ready after {timeout} s")


def test_sigterm_while_the_engine_starts_leaves_no_engine_process(demo_model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ALIGND_KV_CACHE_SPACE_GIB": "1", "ALIGND_MAX_MODEL_LEN": "512"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignd.cli", "serve", "--model", str(demo_model_dir), "--data-dir", str(tmp_path),
         "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Wait until the engine core process exists but the engine is not ready yet, then stop the server.
        deadline = time.monotonic() + 240
        seen: set[psutil.Process] = set()
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            seen.update(psutil.Process(proc.pid).children(recursive=True))
            try:
                ready = httpx.get(f"{url}/ready", timeout=2)
            except httpx.TransportError:
                ready = None
            if ready is not None and ready.status_code == 503 and any(
                    "EngineCore" in " ".join(_cmdline(p)) for p in seen):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) in (0, 1)
        deadline = time.monotonic() + 30
        while alive := [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
            assert time.monotonic() < deadline, f"left behind after SIGTERM during start: {alive}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return [p.name(), *p.cmdline()]
    except psutil.Error:
        return []


def test_serve_with_invalid_config_file_fails_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "alignd.toml"
    config.write_text("[engine]\nmax_loras = 0\n")
    r = subprocess.run([sys.executable, "-m", "alignd.cli", "serve", "--config", str(config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "engine.max_loras" in r.stderr and "--max-loras" in r.stderr

    config.write_text("[server]\nport = \n")
    r = subprocess.run([sys.executable, "-m", "alignd.cli", "serve", "--config", str(config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not valid TOML" in r.stderr

    r = subprocess.run([sys.executable, "-m", "alignd.cli", "serve", "--config", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot read config file" in r.stderr
