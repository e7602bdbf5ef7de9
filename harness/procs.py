"""Child processes, each with its output in a log file and stopped by its PID.

``Proc`` is the one process class of tests and benchmarks: tests read its log, benchmarks
talk to load clients through its pipes (``popen``) and measure it by PID.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# How long a process may take to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT_SECS = 10.0


class Proc:
    """A child process started in the repository root, its output in ``log_dir/<name>.log``.

    ``append``: keep an earlier log of the same name (tests restart processes under one name
    and read the whole story); False starts the log afresh (benchmarks reuse one log folder).
    ``popen_kw`` goes to ``subprocess.Popen`` (pipes, ``preexec_fn``); stdout and stderr go
    to the log unless given.
    """

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_dir: Path, *, append: bool = True, **popen_kw: Any
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab" if append else "wb") as log:  # the child keeps its own copy
            popen_kw.setdefault("stdout", log)
            popen_kw.setdefault("stderr", subprocess.STDOUT if popen_kw["stdout"] is log else None)
            self.popen: subprocess.Popen[Any] = subprocess.Popen(args, env=env, cwd=ROOT, **popen_kw)  # noqa: S603
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` by PID if the process has not exited (its PID is ours until reaped)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL by PID: no clean-up runs."""
        self.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = STOP_TIMEOUT_SECS, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` (SIGTERM) by PID, then SIGKILL if it does not exit within ``timeout``."""
        self.send_signal(sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)
        return self.popen.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_all(procs: Iterable[Proc], timeout: float = STOP_TIMEOUT_SECS) -> None:
    """SIGTERM every process at once, wait for all (bounded), SIGKILL those still running."""
    procs = list(dict.fromkeys(procs))  # a process listed twice is stopped once
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.popen.wait(10)


def pids(procs: Iterable[Proc]) -> list[int]:
    """The PIDs of the processes still running."""
    return [p.pid for p in procs if p.alive()]


def raise_nofile() -> None:
    """Raise this process's open-files limit as far as allowed (thousands of sockets).

    Meant as a ``preexec_fn``: it runs in the child between fork and exec."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(hard, 65536), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            continue


def daphne_args(port: int, ping_interval: int = 20) -> list[str]:
    """One edge, as the Dockerfile runs it (20 s is daphne's default ping interval)."""
    return [
        PYTHON,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "--ping-interval",
        str(ping_interval),
        # A handshake may wait its turn in a reconnect storm: dropped at daphne's default
        # of 5 s, its peer retries and the edge does the work again (docs/decisions/0026).
        "--websocket_connect_timeout",
        "30",
        "tyrum.asgi:application",
    ]


def relay_args(*extra: str) -> list[str]:
    return [PYTHON, "manage.py", "run_backplane", *extra]


def manage(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a management command; return its stdout (raises on a non-zero exit).

    Without ``env``: this test run's database and Redis (``env.child_env``)."""
    from harness.env import child_env

    out = subprocess.run(  # noqa: S603 - our own manage.py
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args[:1])} failed: {out.stderr[-2000:]}")
    return out.stdout
