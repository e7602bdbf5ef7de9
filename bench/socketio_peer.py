"""Side by side: Socket.IO 4 + the official PostgreSQL adapter on the same loopback workload.

Runs the peer benchmark of ``../shared/bench/peer-socketio`` (relative to the repository
root; read-only there) from a
writable copy in ``var/bench/peer-socketio`` (``npm ci`` the first time; ``var/`` is not
committed), with knobs matching ``e2e_latency.py``: 1000 clients on 2 servers, 10 tenants,
~110-byte device events at 500/2000/5000/s and upwards until one fails, fan-out to 1000
clients at 100/s, and a server SIGKILL at 1000/s with socket.io's default reconnect delay.
Its own CPU figures (% of one core per process, sampled from /proc) are kept as they are.

    .venv/bin/python bench/socketio_peer.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SOURCE = Path(os.environ.get("BENCH_SOCKETIO_SOURCE", common.ROOT.parent / "shared" / "bench" / "peer-socketio"))
COPY = common.ROOT / "var" / "bench" / "peer-socketio"
RUN_TIMEOUT_SECS = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="sending time per rate")
    parser.add_argument("--rates", default="500,2000,5000")
    parser.add_argument("--escalate", default="7500,10000,12500,15000")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds (the harness's own BUDGET_S)")
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"no peer benchmark at {SOURCE}")
    sync_copy()
    out_dir = COPY / "results"
    if (out_dir / "results.json").exists():
        (out_dir / "results.json").unlink()
    knobs = {
        "CLIENTS": "1000",
        "TENANTS": "10",
        "MODES": "emitter-nsp",
        "RATES": args.rates,
        "ESCALATE": args.escalate,
        "BISECT": "0",
        "DURATION_S": f"{args.seconds:g}",
        "LARGE_RATES": "",
        "FANOUT_RATES": "100",
        "FANOUT_MODES": "emitter-nsp",
        "KILL_TEST": "1",
        "KILL_FAILOVER_DELAYS": "default",
        "KILL_RATE": "1000",
        "KILL_DURATION_S": "8",
        "KILL_AT_S": "3",
        "BUDGET_S": f"{args.budget:g}",
        "OUT_DIR": str(out_dir),
    }
    common.LOGS.mkdir(parents=True, exist_ok=True)
    log_path = common.LOGS / "socketio-run.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["./run.sh"], cwd=COPY, env={**os.environ, **knobs}, stdout=log, stderr=log)
        try:
            rc = proc.wait(RUN_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = -1
        except BaseException:
            stop(proc)
            raise
    if not (out_dir / "results.json").exists():
        print((log_path.read_text(errors="replace"))[-3000:])
        raise SystemExit(f"the Socket.IO run failed (exit {rc}); log: {log_path}")
    data = json.loads((out_dir / "results.json").read_text())
    rows = [flatten(r) for r in data["results"]]
    sweeps = data.get("sweeps", [])
    kill = next((r.get("kill") for r in data["results"] if r.get("kill")), None)
    common.report(
        "Socket.IO 4 + @socket.io/postgres-adapter (emitter with nsp shim) — same workload; "
        "CPU in % of one core (their harness)",
        rows,
        [
            "phase",
            "rate",
            "sent",
            "received",
            "lost",
            "lost_pct",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "recv_rate",
            "ok",
            "cpu_servers_pct",
            "cpu_producer_pct",
            "cpu_clients_pct",
            "cpu_postgres_pct",
            "cpu_machine_pct",
        ],
    )
    for s in sweeps:
        print(f"max sustainable ({s['mode']}): {s['maxSustainable']}/s (first failing: {s.get('firstFail')})")
    if kill:
        print(f"kill: {json.dumps(kill)}")
    print(f"versions: {data.get('versions')}; ran {time.monotonic() - started:.0f}s")
    extra = {"sweeps": sweeps, "kill": kill, "versions_peer": data.get("versions"), "knobs": knobs}
    print("wrote", common.write("socketio", rows, extra))


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM run.sh: its trap stops what it started, by PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def sync_copy() -> None:
    """Refresh the writable copy from the shared source (keeping node_modules)."""
    COPY.mkdir(parents=True, exist_ok=True)
    for src in SOURCE.iterdir():
        if src.name in ("node_modules", "results") or not src.is_file():
            continue
        dst = COPY / src.name
        if dst.exists() and filecmp.cmp(src, dst, shallow=False):
            continue
        if dst.exists():
            dst.chmod(dst.stat().st_mode | stat.S_IWUSR)
        shutil.copyfile(src, dst)
        dst.chmod(src.stat().st_mode | stat.S_IWUSR)
        if src.name in ("package.json", "package-lock.json") and (COPY / "node_modules").exists():
            shutil.rmtree(COPY / "node_modules")  # dependencies changed: run.sh runs npm ci again


def flatten(r: dict[str, Any]) -> dict[str, Any]:
    cpu = r.get("cpu") or {}
    servers = [s for s in cpu.get("servers", []) if s is not None]
    return {
        "phase": r["phase"].split(" (")[0],
        "mode": r["mode"],
        "rate": r["targetRate"],
        "secs": r["durationS"],
        "sent": r["sent"],
        "expected": r["expected"],
        "received": r["received"],
        "lost": r["lost"],
        "lost_pct": r.get("lostPct"),
        "p50_ms": _num(r.get("p50")),
        "p90_ms": _num(r.get("p90")),
        "p99_ms": _num(r.get("p99")),
        "max_ms": _num(r.get("max")),
        "recv_rate": r.get("recvRate"),
        "ok": bool(r.get("pass")),
        "cpu_servers_pct": "/".join(str(s) for s in servers),
        "cpu_producer_pct": cpu.get("producer"),
        "cpu_clients_pct": cpu.get("clients"),
        "cpu_postgres_pct": cpu.get("postgres"),
        "cpu_machine_pct": cpu.get("machine"),
        "cpu": cpu,
    }


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


if __name__ == "__main__":
    main()
