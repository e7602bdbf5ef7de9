"""A cluster on loopback: daphne edges, relays and other processes started together and
stopped together, each by its PID. Tests (e2e, faults) and benchmarks run the same one."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import procs, waits
from harness.procs import Proc

# Bounds on waits (seconds): an edge listening, a relay holding its shards.
EDGE_START_TIMEOUT_SECS = 30.0
RELAY_START_TIMEOUT_SECS = 30.0


@dataclass
class Cluster:
    """Edges, relays and other processes over one environment (database, Redis, prefix).

    ``append_logs``: see ``Proc``. ``raise_nofile``: edges start with the open-files limit
    raised (a benchmark's thousands of sockets).
    """

    log_dir: Path
    env: dict[str, str]
    append_logs: bool = True
    raise_nofile: bool = False
    edges: list[Proc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    relays: list[Proc] = field(default_factory=list)
    others: list[Proc] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for port in self.ports]

    @property
    def edge_ids(self) -> list[str]:
        return [edge.name for edge in self.edges]

    @property
    def procs(self) -> list[Proc]:
        return [*self.others, *self.relays, *self.edges]

    def _edge(self, name: str, port: int, ping_interval: int, env: dict[str, str]) -> Proc:
        kw: dict[str, Any] = {"preexec_fn": procs.raise_nofile} if self.raise_nofile else {}
        return Proc(
            name,
            procs.daphne_args(port, ping_interval),
            {**self.env, **env, "EDGE_ID": name},
            self.log_dir,
            append=self.append_logs,
            **kw,
        )

    def start_edges(self, names: list[str], ping_interval: int = 20, *, wait: bool = True, **env: str) -> None:
        """Start daphne edges (``EDGE_ID`` = name) at once, then wait for their ports (bounded)."""
        started = []
        for name in names:
            port = waits.free_port()
            proc = self._edge(name, port, ping_interval, env)
            self.edges.append(proc)
            self.ports.append(port)
            started.append((proc, port))
        if wait:
            for proc, port in started:
                self.wait_edge(proc, port)

    def wait_edge(self, proc: Proc, port: int) -> None:
        try:
            waits.wait_port(port, timeout=EDGE_START_TIMEOUT_SECS)
        except TimeoutError:
            raise AssertionError(f"{proc.name} did not listen: {proc.log()[-2000:]}") from None

    def restart_edge(self, i: int, ping_interval: int = 20, **env: str) -> Proc:
        """Stop edge ``i`` (if alive) and start it again with the same name and port."""
        old = self.edges[i]
        old.stop()
        self.edges[i] = self._edge(old.name, self.ports[i], ping_interval, env)
        self.wait_edge(self.edges[i], self.ports[i])
        return self.edges[i]

    def kill_edge(self, i: int) -> None:
        """SIGKILL edge ``i`` by PID: no drain, no clean-up."""
        self.edges[i].stop(timeout=5, sig=signal.SIGKILL)

    def start_relay(self, name: str, *extra: str, wait: bool = True, **env: str) -> Proc:
        """Start ``manage.py run_backplane`` (with ``extra`` arguments); with ``wait``, return
        once it holds its shards (bounded)."""
        proc = Proc(name, procs.relay_args(*extra), {**self.env, **env}, self.log_dir, append=self.append_logs)
        self.relays.append(proc)
        if wait:
            waits.wait_for(
                lambda: "took shards" in proc.log() or not proc.alive(),
                timeout=RELAY_START_TIMEOUT_SECS,
                what=f"{name} to take its shards",
            )
            assert proc.alive(), proc.log()[-2000:]
        return proc

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None, **popen_kw: Any) -> Proc:
        """Start another child process (stopped with the cluster) with ``env`` over the cluster's."""
        proc = Proc(name, args, {**self.env, **(env or {})}, self.log_dir, append=self.append_logs, **popen_kw)
        self.others.append(proc)
        return proc

    def logs(self) -> dict[str, str]:
        """Every process's log by name (readable after the processes stopped, too)."""
        return {p.name: p.log_path.read_text(errors="replace") for p in self.procs}

    def stop(self) -> None:
        """Stop every process by its PID (SIGTERM to all at once, SIGKILL after the bound)."""
        procs.stop_all(self.procs)

    def register_edges(self) -> None:
        """Make sure each edge's directory row exists.

        A test that removes one (as another edge's sweep would) leaves a live edge that
        refuses new sockets until its next heartbeat re-registers it (5 s): a product bug
        shown by test_lifecycle.py::test_edge__swept_directory_row_still_accepts_new_sockets,
        kept out of the other tests by this.
        """
        from backplane.models import Edge

        for name in self.edge_ids:
            Edge.objects.get_or_create(edge_id=name)
