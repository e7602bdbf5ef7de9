"""Before/after in one session: ``bench/e2e_latency.py --only e2e,floor`` on an earlier
revision's code and on this tree, alternating.

The earlier revision is exported with ``git archive`` into a temporary directory (this
repository's git data is only read), given this tree's ``.venv``, and run from there; each
round runs the base, then this tree. Per round and rate: p50/p99 commit → peer, the median
commit → assigned and assigned → peer, the floor's p50 and the processes' CPU, as a table and
``bench/results/ab_e2e.json``.

    .venv/bin/python bench/ab_e2e.py --base REV [--rounds 2] [--rates 500,2000] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> str:
    """The tree of ``rev`` in ``into`` with this tree's virtualenv; return its short hash."""
    short = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / ".venv").symlink_to((ROOT / ".venv").resolve())
    return short


def run(tree: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    argv = [str(tree / ".venv" / "bin" / "python"), str(tree / "bench" / "e2e_latency.py"), "--only", args.only]
    argv += ["--peers", str(args.peers), "--rates", args.rates, "--escalate", "0", "--seconds", str(args.seconds)]
    subprocess.run(argv, cwd=tree, env=dict(os.environ), check=True, timeout=1800)  # noqa: S603 - our own script
    return list(json.loads((tree / "bench" / "results" / "e2e_latency.json").read_text())["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with (e.g. main, a commit)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rates", default="500,2000")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--only", default="e2e,floor")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tyrum-ab-") as tmp:
        base_tree = Path(tmp)
        base = export(args.base, base_tree)
        here = f"{common.code_version()} (this tree)"
        for i in range(args.rounds):
            for label, tree in ((base, base_tree), (here, ROOT)):
                for r in run(tree, args):
                    rows.append(
                        {
                            "code": label,
                            "round": i + 1,
                            "phase": r["phase"],
                            "rate": r["rate"],
                            "p50_ms": r["p50_ms"],
                            "p99_ms": r["p99_ms"],
                            "to_assigned_ms": r.get("p50_to_assigned_ms"),
                            "assigned_to_peer_ms": r.get("p50_assigned_to_peer_ms"),
                            "cpu_edges": r.get("cpu_edges"),
                            "cpu_relay": r.get("cpu_relay"),
                            "lost": r["lost"],
                            "recv_rate": r.get("recv_rate"),
                            "ok": r.get("ok"),
                        }
                    )
    common.report(
        f"e2e before/after, alternating ({args.rounds} rounds, {args.peers} peers, {args.seconds:g}s per rate)",
        rows,
        [
            "code",
            "round",
            "phase",
            "rate",
            "p50_ms",
            "p99_ms",
            "to_assigned_ms",
            "assigned_to_peer_ms",
            "cpu_edges",
            "cpu_relay",
            "lost",
            "recv_rate",
            "ok",
        ],
    )
    print(f"wrote {common.write('ab_e2e', rows, {'base': base})}")
    print(common.machine_line())


if __name__ == "__main__":
    main()
