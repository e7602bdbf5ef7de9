"""Helpers shared by integration and e2e tests: ports, processes (stopped by PID), env."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process with its output in a log file; stopped by its PID."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL by PID: no clean-up runs."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID, then SIGKILL if it does not exit in time."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._log.close()
        return self.popen.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: this test run's database and Redis."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = dict(os.environ)
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        user = db.get("USER") or "postgres"
        env["DATABASE_URL"] = f"postgres://{user}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"
    env["REDIS_URL"] = settings.REDIS_URL
    env["BACKPLANE_CHANNEL_PREFIX"] = settings.BACKPLANE_CHANNEL_PREFIX
    # The children encrypt with this run's keys; a run without keys has them trust Redis.
    keys = settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("symmetric_encryption_keys")
    env["BACKPLANE_REDIS_KEYS" if keys else "BACKPLANE_REDIS_TRUSTED"] = ",".join(keys) if keys else "true"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def start_daphne(name: str, port: int, env: dict[str, str], log_dir: Path) -> Proc:
    args = [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "--ping-interval", "20",
            "tyrum.asgi:application"]
    proc = Proc(name, args, {**env, "EDGE_ID": name}, log_dir)
    wait_port(port)
    return proc


def start_relay(name: str, env: dict[str, str], log_dir: Path, *extra: str) -> Proc:
    return Proc(name, [PYTHON, "manage.py", "run_backplane", *extra], env, log_dir)


def manage(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a management command; return its stdout (raises on a non-zero exit)."""
    out = subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=env or child_env(), capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args[:1])} failed: {out.stderr[-2000:]}")
    return out.stdout
