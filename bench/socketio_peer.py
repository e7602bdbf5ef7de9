"""Side by side: Socket.IO 4 + the official PostgreSQL adapter on the same loopback workload.

Runs the peer benchmark of ``../shared/bench/peer-socketio`` (relative to the repository
root; read-only there) from a
writable copy in ``var/bench/peer-socketio`` (``npm ci`` the first time; ``var/`` is not
committed), with knobs matching ``e2e_latency.py``: 1000 clients on 2 servers, 10 tenants,
~110-byte device events at 500/2000/5000/s and upwards until one fails, fan-out to 1000
clients at 100/s, and a server SIGKILL at 1000/s with socket.io's default reconnect delay.
Its own CPU figures (% of one core per process, sampled from /proc) are kept as they are.

Then the fan-out ceiling, as ``e2e_latency.py`` searches it: the harness runs every rate of
its ``FANOUT_RATES`` whether or not one failed, so it is driven from here instead — one
fan-out-only run of the harness per rate (``--fanout-ceiling``), rising until one fails
(p99 > 1 s, fewer than 95 % of the deliveries received, or any lost), then once between the
last pass and that failure.

    .venv/bin/python bench/socketio_peer.py [--seconds 6] [--fanout-ceiling 200,300,…|0]
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
    parser.add_argument(
        "--fanout-ceiling",
        default="200,300,400,600,800",
        help="tenant-wide rates for the fan-out ceiling search, one harness run each ('0': none)",
    )
    parser.add_argument("--fanout-ceiling-seconds", type=float, default=4.0, help="sending time per ceiling rate")
    parser.add_argument("--ceiling-budget", type=float, default=90.0, help="seconds the ceiling search may take")
    parser.add_argument("--only-ceiling", action="store_true", help="run the fan-out ceiling search alone")
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"no peer benchmark at {SOURCE}")
    sync_copy()
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    kill = versions = None
    knobs = dict(
        KNOBS,
        RATES=args.rates,
        ESCALATE=args.escalate,
        DURATION_S=f"{args.seconds:g}",
        BUDGET_S=f"{args.budget:g}",
    )
    if not args.only_ceiling:
        data = harness_run(knobs, "socketio-run.log")
        rows = [flatten(r) for r in data["results"]]
        sweeps = data.get("sweeps", [])
        kill = next((r.get("kill") for r in data["results"] if r.get("kill")), None)
        versions = data.get("versions")
    ceiling = fanout_ceiling(args, rows)
    versions = versions or ceiling.get("versions")
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
    if ceiling:
        print(
            f"fan-out ceiling: {ceiling['deliveries_per_s']} deliveries/s at {ceiling['max_rate']} events/s "
            f"(p50 {ceiling['p50_ms']} ms, p99 {ceiling['p99_ms']} ms; first failing {ceiling['first_failing']}; "
            f"tried {ceiling['tried']})"
        )
    if kill:
        print(f"kill: {json.dumps(kill)}")
    print(f"versions: {versions}; ran {time.monotonic() - started:.0f}s")
    extra = {"sweeps": sweeps, "kill": kill, "versions_peer": versions, "knobs": knobs, "fanout_ceiling": ceiling}
    print("wrote", common.write("socketio", rows, extra))


# The workload of e2e_latency.py, in the harness's knobs (see CFG in its bench.js).
KNOBS = {
    "CLIENTS": "1000",
    "TENANTS": "10",
    "MODES": "emitter-nsp",
    "BISECT": "0",
    "LARGE_RATES": "",
    "FANOUT_RATES": "100",
    "FANOUT_MODES": "emitter-nsp",
    "KILL_TEST": "1",
    "KILL_FAILOVER_DELAYS": "default",
    "KILL_RATE": "1000",
    "KILL_DURATION_S": "8",
    "KILL_AT_S": "3",
}


def harness_run(knobs: dict[str, str], log_name: str) -> dict[str, Any]:
    """One run of the harness (run.sh) with ``knobs``; its results.json."""
    out_dir = COPY / "results"
    if (out_dir / "results.json").exists():
        (out_dir / "results.json").unlink()
    common.LOGS.mkdir(parents=True, exist_ok=True)
    log_path = common.LOGS / log_name
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["./run.sh"], cwd=COPY, env={**os.environ, **knobs, "OUT_DIR": str(out_dir)}, stdout=log, stderr=log
        )
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
    data: dict[str, Any] = json.loads((out_dir / "results.json").read_text())
    return data


def fanout_ceiling(args: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fan-out ceiling: one fan-out-only harness run per rate, rising until one fails,
    then once between the last pass and the failure; appends its rows to ``rows``."""
    import e2e_latency

    steps = e2e_latency._rates(args.fanout_ceiling)
    if not steps:
        return {}
    found: list[dict[str, Any]] = [r for r in rows if r["phase"] == "fanout"]
    versions: dict[str, Any] = {}
    begun = time.monotonic()

    def run(rate: float) -> bool:
        knobs = dict(
            KNOBS,
            MODES="",
            RATES="",
            ESCALATE="",
            FANOUT_RATES=f"{rate:g}",
            KILL_TEST="0",
            DURATION_S=f"{args.fanout_ceiling_seconds:g}",
            BUDGET_S="60",
        )
        data = harness_run(knobs, f"socketio-fanout-{rate:g}.log")
        versions.update(data.get("versions") or {})
        fan = [flatten(r) for r in data["results"] if r["phase"].startswith("fanout")]
        if not fan:
            return False
        row = fan[0]
        row["phase"] = "fanout ceiling"
        rows.append(row)
        found.append(row)
        print(
            f"  Socket.IO fan-out {rate:g}/s: {row['received']} of {row['expected']} received, "
            f"{row['recv_rate']}/s, p50 {row['p50_ms']} p99 {row['p99_ms']} ms {'PASS' if row['ok'] else 'FAIL'}",
            flush=True,
        )
        return bool(row["ok"])

    known = [r["rate"] for r in found if r["ok"]]  # the main run's fan-out at 100/s
    best, first_fail = e2e_latency.ladder(
        run,
        [],
        steps,
        lambda: time.monotonic() - begun > args.ceiling_budget,
        grain=50,
        passed_before=max(known) if known else None,
    )
    passing = [r for r in found if r["ok"]]
    if not passing:
        return {"max_rate": None, "first_failing": first_fail, "tried": _tried(found), "versions": versions}
    top = max(passing, key=lambda r: r["rate"])
    return {
        "max_rate": top["rate"],
        "first_failing": first_fail,
        "deliveries_per_s": top["recv_rate"],
        "p50_ms": top["p50_ms"],
        "p99_ms": top["p99_ms"],
        "tried": _tried(found),
        "versions": versions,
    }


def _tried(rows: list[dict[str, Any]]) -> str:
    return ",".join(f"{r['rate']:g}{'' if r['ok'] else '✗'}" for r in rows)


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
