"""The whole benchmark suite (``make bench``), in 11–15 minutes on the 2-core machine.

Runs each benchmark as its own process, in this order, each bounded in time and the whole
run bounded by ``--budget``: the end-to-end session (latency, raw Channels floor, maximum
rate, edge kill, resume, fan-out), the Socket.IO + PostgreSQL peer right after it (same
session, same workload), producer cost, relay throughput, connect storms and idle connections,
scale by size (5 000 and 20 000 peers on one edge), the relay → peer hop step by step, the
speed libraries (orjson, uvloop) against the standard ones, Redis sealing's cost. Then it copies
the results into ``bench/results/history/<time>/`` and prints the summary (``report.py``):
targets met or missed, ratios against the raw floor and the peer, medians over past runs.

    .venv/bin/python bench/run_all.py [--budget 1200] [--skip socketio,connections]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = Path(__file__).resolve().parent
# (name, script, extra args, longest it may take in seconds, least worth starting with)
STEPS: list[tuple[str, str, list[str], float, float]] = [
    # e2e: the device-rate ladders go up to failure and the fan-out searches its ceiling.
    ("e2e", "e2e_latency.py", [], 420, 120),
    # socketio: its fan-out ceiling is several short harness runs after the main one.
    ("socketio", "socketio_peer.py", [], 260, 60),
    ("producer", "producer.py", [], 60, 20),
    ("relay_throughput", "relay_throughput.py", [], 90, 30),
    # Two phases: one edge's storm, and the storm after an edge SIGKILL (2 × 10 000 peers).
    ("connections", "connections.py", [], 300, 90),
    # Scale by size (issue 17, 5): 5 000 and 20 000 peers on one edge, 10 % receiving. Work
    # windows of 20 s: the edge's periodic walks (heartbeat every 5 s, head-check sweep every
    # 30 s) land in a 5 s window or not, which moved its CPU per frame by a third.
    ("scale", "scale.py", ["--seconds", "20"], 260, 120),
    # The relay → peer hop step by step (issue 17, 3): where the e2e latency is spent.
    ("hop_trace", "hop_trace.py", [], 150, 60),
    # The fan-out row split (issue 17, 2): the engine's part (commit → the edge's last write)
    # against the peers' arrival, and each role's run-queue wait.
    ("fanout_trace", "fanout_trace.py", [], 90, 40),
    # Libraries made for speed (issue 17, 6): json/orjson/msgspec, asyncio/uvloop, same run.
    ("speed_libs", "speed_libs.py", ["--repeat", "3", "--loops-repeat", "2"], 150, 40),
    # Redis sealing's cost (issues 13, 17): no keys, Fernet and AES-GCM on the relay → edge hop
    # (its --e2e adds the cluster without and with keys, outside the suite for time).
    ("encryption", "encryption_cost.py", [], 120, 30),
]
OUTPUTS = {
    "e2e": ["e2e_latency", "max_rate", "edge_kill", "resume", "fanout"],
    "socketio": ["socketio"],
    "producer": ["producer"],
    "relay_throughput": ["relay_throughput"],
    "connections": ["connections"],
    "scale": ["scale"],
    "hop_trace": ["hop_trace"],
    "fanout_trace": ["fanout_trace"],
    "speed_libs": ["speed_libs"],
    "encryption": ["encryption_cost"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1200.0, help="seconds for the whole suite")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.monotonic()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    print(common.machine_line(), flush=True)
    print(f"machine busy before starting: {busy_cores(3.0):.2f} of {os.cpu_count()} cores", flush=True)
    outcome: dict[str, str] = {}
    for name, script, extra, longest, least in STEPS:
        if name in skip:
            outcome[name] = "skipped (--skip)"
            continue
        left = args.budget - (time.monotonic() - started)
        if left < least:
            outcome[name] = f"skipped: {left:.0f}s of the budget left"
            print(f"\n=== {name}: {outcome[name]}", flush=True)
            continue
        argv = list(extra)
        timeout = min(longest, left)
        if name == "e2e":  # the rate searches stop in time for resume, fan-out and its ceiling
            argv += ["--budget", f"{max(60.0, timeout - 170):.0f}"]
        if name == "socketio":  # the harness's main run, then up to 90 s of fan-out ceiling runs
            argv += ["--budget", f"{max(60.0, timeout - 100):.0f}"]
        if name == "connections":
            argv += ["--budget", f"{max(30.0, timeout - 60):.0f}"]
        if name == "scale":
            argv += ["--budget", f"{max(30.0, timeout - 90):.0f}"]
        for stale in OUTPUTS[name]:  # a failed step must not leave last run's figures as this run's
            with contextlib.suppress(FileNotFoundError):
                (common.RESULTS / f"{stale}.json").unlink()
        print(f"\n=== {name} ({script}, up to {timeout:.0f}s)", flush=True)
        t0 = time.monotonic()
        outcome[name] = run(script, argv, timeout)
        print(f"=== {name}: {outcome[name]} in {time.monotonic() - t0:.0f}s", flush=True)
    archive(stamp)
    print("\n=== summary\n", flush=True)
    subprocess.run([common.PY, str(BENCH / "report.py")], cwd=common.ROOT, check=False, timeout=60)
    total = time.monotonic() - started
    print(f"\nsuite ran {total:.0f}s; " + "; ".join(f"{k}: {v}" for k, v in outcome.items()))
    if any(not v.startswith(("ok", "skipped")) for v in outcome.values()):
        sys.exit(1)


def run(script: str, argv: list[str], timeout: float) -> str:
    proc = subprocess.Popen([common.PY, str(BENCH / script), *argv], cwd=common.ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        # SIGINT first: the script's finally blocks stop what it started, by PID.
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        return f"FAILED: timed out after {timeout:.0f}s"
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        proc.wait(30)
        raise
    return "ok" if rc == 0 else f"FAILED (exit {rc})"


def archive(stamp: str) -> None:
    dest = common.RESULTS / "history" / stamp
    dest.mkdir(parents=True, exist_ok=True)
    for names in OUTPUTS.values():
        for name in names:
            src = common.RESULTS / f"{name}.json"
            if src.exists():
                shutil.copy2(src, dest / src.name)


def busy_cores(secs: float) -> float:
    a = common.machine_busy_seconds()
    time.sleep(secs)
    return (common.machine_busy_seconds() - a) / secs


if __name__ == "__main__":
    main()
