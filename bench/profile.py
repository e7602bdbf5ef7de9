"""Profile a process of a running benchmark with py-spy and summarise the hot frames.

With ``--pg DB_PREFIX`` it samples PostgreSQL instead: every 20 ms, the statements that the
backends of databases named ``DB_PREFIX…`` are running (``pg_stat_activity``, state active),
and prints the statements seen most often with what they were waiting on — a sampling
profile of where PostgreSQL's time goes.

Otherwise it finds the process by a string in its command line or environment (e.g. ``EDGE_ID=conn-edge``
for the edge of ``connections.py``, ``run_backplane`` for a relay), records ``--secs`` seconds
(``py-spy record -f raw``), and prints the functions with the most samples, by self time (the
leaf frame) and inclusive. Start the benchmark first, then this, in another shell:

    .venv/bin/python bench/profile.py --match EDGE_ID=e2e-edge-0 --secs 5 [--wait 60] [--out FILE]
    .venv/bin/python bench/profile.py --match run_backplane --match CHANNEL_PREFIX=benche2e --idle
    .venv/bin/python bench/profile.py --pg tyrum_bench_e2e --secs 5 --wait 60
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from harness import scratch  # noqa: E402

PYSPY = common.ROOT / ".venv" / "bin" / "py-spy"


def find(matches: list[str]) -> int | None:
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "python" not in cmd or "profile.py" in cmd:
            continue
        if all(m in cmd or any(m.encode() in e for e in env) for m in matches):
            return int(d)
    return None


def summarise(raw: Path, top: int) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + (" (" + f.split(" (")[1].split(":")[0] + ")" if " (" in f else "")
            for f in stack.split(";")
        ]
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    lines = [f"{total} samples", "", "self (leaf frame):"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in self_time.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def sample_postgres(prefix: str, secs: float, wait: float, delay: float, top: int) -> str:
    import psycopg

    seen: Counter[tuple[str, str]] = Counter()
    samples = 0
    with psycopg.connect(scratch.PG_ADMIN, autocommit=True) as conn:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE %s", [prefix + "%"]).fetchone()
            if row:
                break
            time.sleep(0.5)
        time.sleep(delay)
        cpu0 = _postgres_cpu()
        stop = time.monotonic() + secs
        while time.monotonic() < stop:
            rows = conn.execute(
                "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 110), "
                "coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity "
                "WHERE datname LIKE %s AND state = 'active' AND pid <> pg_backend_pid()",
                [prefix + "%"],
            ).fetchall()
            samples += 1
            for q, w in rows:
                seen[(q, w)] += 1
            time.sleep(0.02)
    cpu1 = _postgres_cpu()
    lines = [f"{samples} samples of active statements (share of samples with that statement running)"]
    lines += [f"  {n / max(1, samples):6.1%}  [{w}]  {q}" for (q, w), n in seen.most_common(top)]
    by_kind: Counter[str] = Counter()
    for pid, (kind, secs_now) in cpu1.items():
        by_kind[kind] += secs_now - cpu0.get(pid, (kind, 0.0))[1]
    lines += ["", f"PostgreSQL processes' CPU over the {secs:g}s, by process title:"]
    lines += [f"  {v:6.2f} CPU-s  {k}" for k, v in by_kind.most_common(top) if v > 0.005]
    return "\n".join(lines)


def _postgres_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of every postgres process, with its title (database and state stripped of
    the client address, so backends group by kind)."""
    import re

    out: dict[int, tuple[str, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            if stat[stat.index("(") + 1 : stat.rindex(")")] != "postgres":
                continue
            title = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        title = re.sub(r"127\.0\.0\.1\(\d+\)", "", re.sub(r"_\d+\b", "", title))
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d)] = (title, (int(fields[11]) + int(fields[12])) / common.CLK_TCK)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--match", action="append", help="repeat: all must match")
    parser.add_argument("--pg", default=None, help="sample PostgreSQL statements of databases with this prefix")
    parser.add_argument("--idle", action="store_true", help="count waiting threads too (wall-clock view)")
    parser.add_argument(
        "--gil", action="store_true", help="only the thread holding the GIL: the process's Python CPU, no GIL waits"
    )
    parser.add_argument("--secs", type=float, default=5.0)
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the process to appear")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before recording")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.pg:
        print(sample_postgres(args.pg, args.secs, args.wait, args.delay, args.top))
        return
    if not args.match:
        parser.error("--match or --pg is required")
    deadline = time.monotonic() + args.wait
    pid = find(args.match)
    while pid is None and time.monotonic() < deadline:
        time.sleep(0.5)
        pid = find(args.match)
    if pid is None:
        raise SystemExit(f"no python process matches {args.match!r}")
    time.sleep(args.delay)
    out = Path(args.out or common.LOGS / f"pyspy-{pid}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(PYSPY), "record", "-p", str(pid), "-d", str(int(args.secs)), "-f", "raw", "-o", str(out), "--nonblocking"]
        + (["--idle"] if args.idle else [])
        + (["--gil"] if args.gil else []),
        check=True,
        timeout=args.secs + 60,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(f"pid {pid} ({args.match}), {args.secs:g}s, raw profile in {out}")
    print(summarise(out, args.top))


if __name__ == "__main__":
    main()
