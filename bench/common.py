"""The benchmarks' own plumbing: where results go, which Redis they use, CPU accounting,
machine facts and output. Processes, clusters, scratch databases, tenants and tokens come
from the ``harness`` package at the repository root, shared with the tests.

Every benchmark records, per phase, the CPU seconds of each process involved (edges, relay,
load clients, producers, Redis, PostgreSQL) and of the whole machine, and says when a load
client was the bottleneck (it used ≥ 90 % of a core) or the machine was saturated.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the harness package and the project, for scripts run as bench/<name>.py
    sys.path.insert(0, str(ROOT))

from harness import env, scratch  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LOGS = RESULTS / "logs"
# Our own Redis database number; the pub/sub layer ignores it, so every run also uses its own
# channel prefix (see ``prefix()``).
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A load-client process that used this share of one core over a phase was the bottleneck.
BOTTLENECK_CORE_SHARE = 0.9
# The whole machine busier than this share of all cores: the box itself was the limit.
SATURATED_MACHINE_SHARE = 0.95


def prefix(name: str) -> str:
    """A channel prefix of our own for this run (deployments sharing one Redis stay apart)."""
    return f"bench{name}{os.getpid()}"


# --- the harness on the benchmarks' Redis ---------------------------------------------------


def scratch_database(name: str) -> str:
    """``harness.scratch.scratch_database`` on the benchmarks' Redis."""
    return scratch.scratch_database(name, REDIS_URL)


def setup_django(database_url: str, channel_prefix: str) -> None:
    """``harness.scratch.setup_django`` on the benchmarks' Redis."""
    scratch.setup_django(database_url, REDIS_URL, channel_prefix)


def service_env(database_url: str, channel_prefix: str, **extra: str) -> dict[str, str]:
    """``harness.env.service_env`` on the benchmarks' Redis."""
    return env.service_env(database_url, REDIS_URL, channel_prefix, **extra)


# --- CPU and memory -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process so far (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a PostgreSQL process of this machine (its command name)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.index("(") + 1 : stat.rindex(")")] == "postgres"


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; not idle, not iowait)."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in parts]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / CLK_TCK


def oncpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU (``/proc/<pid>/schedstat``: exact, where
    ``/proc/<pid>/stat`` counts 10 ms ticks); 0 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def runq_seconds(pids: list[int], proc: Path = Path("/proc")) -> float:
    """Seconds the processes' threads have spent runnable, waiting for a CPU (schedstat's
    second field: on-CPU ns, run-queue ns, timeslices)."""
    total = 0
    for pid in pids:
        for stat in (proc / str(pid) / "task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                pass  # a thread gone meanwhile
    return total / 1e9


@contextlib.contextmanager
def hop_trace_dir(name: str) -> Iterator[Path]:
    """A fresh directory for the trace files of the processes a benchmark starts from here on
    (``TYRUM_HOP_TRACE``, which they inherit; ``backplane/hoptrace.py``); removed afterwards
    unless ``HOP_TRACE_KEEP`` is set."""
    path = LOGS / f"{name}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    before = os.environ.get("TYRUM_HOP_TRACE")
    os.environ["TYRUM_HOP_TRACE"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("TYRUM_HOP_TRACE", None)
        else:
            os.environ["TYRUM_HOP_TRACE"] = before
        if not os.environ.get("HOP_TRACE_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


def redis_cpu_seconds() -> float:
    """CPU seconds of the Redis server so far (INFO cpu, main process and its threads)."""
    import redis

    try:
        info = redis.Redis.from_url(REDIS_URL, socket_timeout=2).info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except Exception:
        return float("nan")


def _postgres_procs(database: str | None) -> dict[int, float]:
    """CPU seconds of PostgreSQL's processes that are ours: the backends of ``database`` and
    the shared background processes (postmaster, WAL writer, checkpointer, …). Backends of
    other databases (other people's tests on this machine) are left out."""
    out: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            if stat[stat.index("(") + 1 : stat.rindex(")")] != "postgres":
                continue
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        is_backend = "127.0.0.1(" in cmd or "[local]" in cmd
        if is_backend and (database is None or f" {database} " not in cmd):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


# The relay's lease session names itself (backplane.store.postgresql): its backend runs the
# assignments (and the marks), so its CPU is what PostgreSQL spends on them; the relay's other
# connection (sweeps, status rows) counts with the rest.
RELAY_APPLICATION = "tyrum-relay-lease"


def _relay_backends(database: str | None) -> set[int]:
    """PIDs of the relay lease sessions' backends in ``database`` (none without one)."""
    if database is None:
        return set()
    try:
        import psycopg

        with psycopg.connect(scratch.PG_ADMIN, connect_timeout=3, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                [database, RELAY_APPLICATION],
            ).fetchall()
    except Exception:
        return set()
    return {int(r[0]) for r in rows}


class CpuMeter:
    """Snapshots of CPU seconds by role; ``delta`` gives what each role used in between.

    ``roles`` maps a role name to a callable returning the PIDs that play it now (edges,
    relays, load clients); Redis, PostgreSQL (our database's backends plus the shared
    background processes), this process and the whole machine are always measured.
    Short-lived processes (producers) report their own CPU and are added with ``add``.
    """

    def __init__(self, database: str | None, roles: dict[str, Any]) -> None:
        self.database = database
        self.roles = roles

    def snap(self) -> dict[str, Any]:
        relay_backends = _relay_backends(self.database)  # a query: before the readings, not between them
        return {
            "t": time.monotonic(),
            "pids": {role: {pid: cpu_seconds(pid) for pid in get()} for role, get in self.roles.items()},
            "redis": redis_cpu_seconds(),
            "postgres": _postgres_procs(self.database),
            "relay_backends": relay_backends,
            "self": time.process_time(),
            "machine": machine_busy_seconds(),
        }

    def delta(
        self,
        a: dict[str, Any],
        b: dict[str, Any],
        extra: dict[str, float] | None = None,
        reported: set[int] | frozenset[int] = frozenset(),
    ) -> dict[str, Any]:
        """CPU seconds by role between ``a`` and ``b``; ``extra`` adds what processes reported
        themselves, and PostgreSQL backends in ``reported`` (whose CPU is in ``extra``) are
        left out of the snapshots, so they are not counted twice."""
        wall = b["t"] - a["t"]
        out: dict[str, Any] = {"wall_s": round(wall, 2)}
        per_process: dict[str, list[float]] = {}
        for role, now in b["pids"].items():
            before = a["pids"].get(role, {})
            used = [now[pid] - before.get(pid, 0.0) for pid in now]
            per_process[role] = [round(u, 2) for u in used]
            out[role] = round(sum(used), 2)
        out["redis"] = round(b["redis"] - a["redis"], 2)
        out["postgres"] = round(
            sum(v - a["postgres"].get(pid, 0.0) for pid, v in b["postgres"].items() if pid not in reported), 2
        )
        # Part of "postgres", not added to it: the relay's lease backends (its assignments).
        relay_pids = (a.get("relay_backends", set()) | b.get("relay_backends", set())) - set(reported)
        relay_pg = sum(v - a["postgres"].get(pid, 0.0) for pid, v in b["postgres"].items() if pid in relay_pids)
        pg_all = sum(v - a["postgres"].get(pid, 0.0) for pid, v in b["postgres"].items() if pid not in reported)
        pg_all += (extra or {}).get("postgres", 0.0)
        out["bench"] = round(b["self"] - a["self"], 2)
        for role, secs in (extra or {}).items():
            out[role] = round(out.get(role, 0.0) + secs, 2)
        ours = sum(v for k, v in out.items() if k not in ("wall_s", "machine", "other"))
        out["machine"] = round(b["machine"] - a["machine"], 2)
        out["other"] = round(max(0.0, out["machine"] - ours), 2)  # someone else on the box
        out["postgres_relay"] = round(relay_pg, 3)
        out["postgres_others"] = round(pg_all - relay_pg, 3)  # from the unrounded sums
        out["per_process"] = per_process
        return out


def notes_for(cpu: dict[str, Any], load_roles: Iterable[str], label: str) -> list[str]:
    """Say when a load client was the bottleneck or the machine was saturated."""
    notes = []
    wall = cpu["wall_s"] or 1.0
    for role in load_roles:
        for i, used in enumerate(cpu.get("per_process", {}).get(role, [])):
            if used >= BOTTLENECK_CORE_SHARE * wall:
                notes.append(
                    f"{label}: load client {role}[{i}] used {used:.1f} CPU-s in {wall:.1f}s "
                    f"({used / wall:.0%} of a core): the load client was the bottleneck"
                )
    cores = os.cpu_count() or 1
    if cpu["machine"] >= SATURATED_MACHINE_SHARE * wall * cores:
        notes.append(
            f"{label}: the machine was saturated ({cpu['machine'] / wall / cores:.0%} of {cores} cores busy; "
            f"{cpu['other']:.1f} CPU-s by processes outside this benchmark)"
        )
    elif cpu["other"] >= 0.2 * wall:
        notes.append(f"{label}: other processes on the machine used {cpu['other']:.1f} CPU-s in {wall:.1f}s")
    return notes


def cpu_columns(cpu: dict[str, Any], roles: Sequence[str]) -> dict[str, float]:
    """Flatten a CPU delta into ``cpu_<role>`` columns for tables."""
    return {f"cpu_{r}": cpu.get(r, 0.0) for r in roles}


# --- facts, stats, output ---------------------------------------------------------------------


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for mod in (
        "django",
        "channels",
        "channels_redis",
        "daphne",
        "twisted",
        "autobahn",
        "psycopg",
        "redis",
        "websockets",
        "msgpack",
    ):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "") or getattr(m, "version", ""))
        except Exception:
            pass
    try:
        import psycopg

        with psycopg.connect(scratch.PG_ADMIN, connect_timeout=3) as conn:
            out["postgresql"] = str(conn.execute("SHOW server_version").fetchone()[0])
    except Exception:
        pass
    try:
        import redis

        out["redis_server"] = str(redis.Redis.from_url(REDIS_URL, socket_timeout=2).info("server")["redis_version"])
    except Exception:
        pass
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "commit": code_version(),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "loadavg": os.getloadavg(),
        "speed": cpu_speed(),
        "versions": versions(),
    }


@functools.cache
def cpu_speed() -> dict[str, float]:
    """A tiny calibration, so runs on different days can be told apart: how long this Python
    takes for 2 million loop additions (ms; best of 3), and the share of CPU time the
    hypervisor stole over the last second. This VM's speed varies by ~2x from day to day."""
    import time

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)

    def stat() -> list[int]:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]

    steal = 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):
        a = stat()
        time.sleep(1.0)
        b = stat()
        d = [y - x for x, y in zip(a, b, strict=False)]
        steal = d[7] / max(1, sum(d[:8]))
    return {"loop_2m_ms": round(best * 1000, 1), "steal_share": round(steal, 3)}


def code_version() -> str:
    """The commit measured, with ``+dirty`` when the product code has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "backplane", "tyrum"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_line() -> str:
    m = machine()
    v = m["versions"]
    return (
        f"machine: {m['cpu']} × {m['cores']} cores, {m['mem_gib']} GiB; Python {v.get('python')}, "
        f"Django {v.get('django')}, channels {v.get('channels')}, channels-redis {v.get('channels_redis')}, "
        f"daphne {v.get('daphne')}, PostgreSQL {v.get('postgresql')}, Redis {v.get('redis_server')}; "
        f"load average {m['loadavg'][0]:.2f}; speed probe {m['speed']['loop_2m_ms']} ms per 2M Python adds "
        f"(steal {m['speed']['steal_share'] * 100:.0f} %); code {m['commit']}"
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def latency_stats(lat_ms: list[float]) -> dict[str, float]:
    ordered = sorted(lat_ms)

    def q(p: float) -> float:
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]

    return {
        "p50_ms": q(50),
        "p90_ms": q(90),
        "p99_ms": q(99),
        "max_ms": ordered[-1] if ordered else float("nan"),
    }


def write(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    data = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "rows": rows,
        **(extra or {}),
    }
    out.write_text(json.dumps(data, indent=2, default=str))
    return out


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.2f}"
    return "" if v is None else str(v)


def report(title: str, rows: list[dict[str, Any]], columns: list[str], notes: Iterable[str] = ()) -> None:
    print(f"\n{title}")
    print(table(rows, columns))
    for note in notes:
        print(f"note: {note}")
