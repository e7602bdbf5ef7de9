"""Private services for the failure matrix, so a fault never touches the machine's own:
a Redis server and a PostgreSQL instance on free ports, and a TCP front for the edges.

Each is started and stopped by PID (the PostgreSQL postmaster through ``pg_ctl``, which
signals the PID in its ``postmaster.pid``); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from harness import procs, waits

# --- Redis ----------------------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` of this test only: no persistence, 127.0.0.1, a free port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = waits.free_port()
        self.log_dir = log_dir
        self.proc: procs.Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.starts += 1
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = procs.Proc(f"redis-{self.starts}", args, dict(os.environ), self.log_dir)
        waits.wait_port(self.port, timeout=10)

    def kill(self) -> None:
        """SIGKILL by PID: everything in it is gone, every client connection is cut."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.stop()  # closes its log; the process is gone already

    def pause(self) -> None:
        """SIGSTOP: the port still accepts TCP connections, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.alive():
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process would not see SIGTERM
            self.proc.stop()


# --- PostgreSQL -----------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"no {name} under /usr/lib/postgresql/*/bin")
    return found[-1]


class PrivatePostgres:
    """A PostgreSQL instance of this test only, run as the ``postgres`` OS user.

    ``initdb`` in a fresh directory under /tmp (the postgres user cannot enter pytest's
    root-owned tmp dirs), trust authentication, listening on 127.0.0.1 and a free port
    only, ``fsync=off`` (nothing here needs to survive the machine).
    """

    def __init__(self) -> None:
        self.port = waits.free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tyrum-faults-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.running = False

    def dsn(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def _as_postgres(self, *args: str, timeout: float = 60) -> None:
        out = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True,
                             timeout=timeout, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")

    def init(self) -> None:
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                          "--no-sync")
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                          "-o", opts, "start")
        self.running = True

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: SIGQUIT to the postmaster, no checkpoint; the next
        start runs crash recovery, as after a power cut."""
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        self.running = False

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def createdb(self, name: str) -> None:
        self._as_postgres("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q", "-c",
                          f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        try:
            if self.running or self.postmaster_pid():
                self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                                  "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pid = self.postmaster_pid()
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.running = False
        shutil.rmtree(self.root, ignore_errors=True)


# --- the edges' front -------------------------------------------------------------------------


class EdgeFront:
    """A TCP front for the edges, as an L4 load balancer would be: each new connection goes
    to the first edge that accepts it, ``ports[0]`` (the home edge) first. When an edge dies
    its connections are cut, and the peers' reconnects land on the next edge that is alive.
    """

    CONNECT_TIMEOUT_SECS = 1.0

    def __init__(self, ports: list[int]) -> None:
        self.ports = list(ports)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.routed: list[tuple[float, int]] = []  # (when, upstream port) per accepted connection

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            for port in self.ports:
                try:
                    up_reader, up_writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), self.CONNECT_TIMEOUT_SECS)
                except (OSError, TimeoutError):
                    continue
                self.routed.append((time.time(), port))
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                return
        finally:
            writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error on either side, then close the writing side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()
