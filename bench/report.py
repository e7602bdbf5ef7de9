"""Summarise the results: the issue's targets met or missed, the ratios against the raw
Channels floor and Socket.IO + PostgreSQL, with medians over the archived runs.

Reads ``bench/results/*.json`` (the latest run) and ``bench/results/history/*/`` (every run
of ``run_all.py``); prints Markdown and writes ``bench/results/summary.{md,json}``.

    .venv/bin/python bench/report.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HISTORY = common.RESULTS / "history"
RATES = (500, 2000, 5000)


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def figures(folder: Path) -> dict[str, Any]:
    """Flatten one run's JSON files into ``{figure key: value}``."""
    f: dict[str, Any] = {}
    if e2e := _load(folder, "e2e_latency"):
        for r in e2e["rows"]:
            key = f"{r['phase']}.{int(r['rate'])}"
            for stat in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "lost", "ok", "recv_rate"):
                f[f"{key}.{stat}"] = r[stat]
        f["e2e.connect_s"] = e2e.get("connect", {}).get("secs")
    if mr := _load(folder, "max_rate"):
        for r in mr["rows"]:
            f[("e2e" if r["system"].startswith("backplane") else "floor") + ".max_rate"] = r["max_sustainable"]
    if fan := _load(folder, "fanout"):
        r = fan["rows"][0]
        f.update(
            {
                "fanout.deliveries_per_s": r["deliveries_per_s"],
                "fanout.p50_ms": r["p50_ms"],
                "fanout.p99_ms": r["p99_ms"],
                "fanout.lost": r["lost"],
            }
        )
        if ceiling := fan.get("ceiling"):
            f["fanout.ceiling_dps"] = ceiling.get("deliveries_per_s")
            f["fanout.ceiling_p99_ms"] = ceiling.get("p99_ms")
    if kill := _load(folder, "edge_kill"):
        r = kill["rows"][0]
        f.update({"kill.lost": r["lost"], "kill.lost_pct": r["lost_pct"], "kill.sent": r["sent"]})
    if prod := _load(folder, "producer"):
        f["producer.overhead_pct"] = prod["publish_overhead"] * 100
        for r in prod["rows"]:
            if r["figure"].startswith("publish_many"):
                f["producer.publish_many_eps"] = r["events_per_sec"]
    if relay := _load(folder, "relay_throughput"):
        for r in relay["rows"]:
            if r["figure"].startswith("assign+forward, 1 relay"):
                f["relay.1.eps"] = r["events_per_sec"]
            elif r["figure"].startswith("assign+forward, 2 relay"):
                f["relay.2.eps"] = r["events_per_sec"]
    if res := _load(folder, "resume"):
        f["resume.ms"] = statistics.median(r["connect_to_resumed_ms"] for r in res["rows"])
        f["resume.recovered"] = all(r["recovered"] for r in res["rows"])
    if conn := _load(folder, "connections"):
        for r in conn["rows"]:
            if r.get("phase", "one edge") == "one edge":
                f.update(
                    {
                        "conn.peers": r["peers"],
                        "conn.connected": r["connected"],
                        "conn.kb_per_conn": r["kb_per_conn"],
                        "conn.storm_s": r["storm_s"],
                        "conn.connects_per_s": r["connects_per_s"],
                        "conn.idle_cpu_pct": r["edge_idle_cpu_pct"],
                    }
                )
            elif r["phase"] == "after a kill":
                f["conn.kill.back_s"] = r["kill_to_all_back_s"]
                f["conn.kill.back_within_15s"] = r["back_within_target"]
                f["conn.kill.lost"] = r["lost"]
    if scale := _load(folder, "scale"):
        for r in scale["rows"]:
            k = f"scale.{r['peers']}.{r['phase'].replace(' ', '_')}"
            f[f"{k}.edge_cpu_pct"] = r["edge_cpu_pct"]
            if r["phase"] != "idle":
                f[f"{k}.us_per_frame"] = r["edge_us_per_frame"]
                if "edge_us_per_frame_above_idle" in r:
                    f[f"{k}.us_per_frame_above_idle"] = r["edge_us_per_frame_above_idle"]
                f[f"{k}.p99_ms"] = r["p99_ms"]
    if sio := _load(folder, "socketio"):
        for r in sio["rows"]:
            if r["phase"] == "device":
                for stat in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "lost", "ok", "recv_rate"):
                    f[f"sio.{int(r['rate'])}.{stat}"] = r[stat]
            elif r["phase"] == "fanout":  # its 100/s run (the ceiling's rows are "fanout ceiling")
                f["sio.fanout.deliveries_per_s"] = r["recv_rate"]
                f["sio.fanout.p50_ms"] = r["p50_ms"]
                f["sio.fanout.p99_ms"] = r["p99_ms"]
            elif r["phase"].startswith("kill"):
                f["sio.kill.lost"] = r["lost"]
                f["sio.kill.lost_pct"] = r["lost_pct"]
        for s in sio.get("sweeps", []):
            f["sio.max_rate"] = s["maxSustainable"]
        if ceiling := sio.get("fanout_ceiling"):
            f["sio.fanout.ceiling_dps"] = ceiling.get("deliveries_per_s")
            f["sio.fanout.ceiling_p99_ms"] = ceiling.get("p99_ms")
    return f


@dataclass(frozen=True)
class Target:
    figure: str
    key: str
    target: str
    met: Callable[[float], bool]
    limit: float
    lower_is_better: bool
    unit: str


TARGETS = [
    Target("e2e latency at 500 ev/s, p50", "e2e.500.p50_ms", "≤ 1.5 ms", lambda v: v <= 1.5, 1.5, True, "ms"),
    Target("e2e latency at 500 ev/s, p99", "e2e.500.p99_ms", "≤ 6 ms", lambda v: v <= 6, 6, True, "ms"),
    Target("e2e latency at 2000 ev/s, p99", "e2e.2000.p99_ms", "≤ 25 ms", lambda v: v <= 25, 25, True, "ms"),
    Target(
        "max sustainable device rate",
        "e2e.max_rate",
        "≥ 15 000 ev/s",
        lambda v: v >= 15_000,
        15_000,
        False,
        "ev/s",
    ),
    Target(
        "fan-out 1000 peers × 100 ev/s: deliveries/s",
        "fanout.deliveries_per_s",
        "100 000 (≥ 95 % counted)",
        lambda v: v >= 95_000,
        100_000,
        False,
        "/s",
    ),
    Target("fan-out 1000 peers × 100 ev/s: p50", "fanout.p50_ms", "≤ 10 ms", lambda v: v <= 10, 10, True, "ms"),
    Target("fan-out 1000 peers × 100 ev/s: p99", "fanout.p99_ms", "≤ 60 ms", lambda v: v <= 60, 60, True, "ms"),
    Target(
        "fan-out ceiling, 1000 peers (p99 ≤ 1 s)",
        "fanout.ceiling_dps",
        "≥ 200 000 deliveries/s",
        lambda v: v >= 200_000,
        200_000,
        False,
        "/s",
    ),
    Target("events lost when an edge is SIGKILLed", "kill.lost", "0", lambda v: v == 0, 0, True, "events"),
    Target(
        "publish() overhead, small transaction", "producer.overhead_pct", "≤ 45 %", lambda v: v <= 45, 45, True, "%"
    ),
    Target("publish_many", "producer.publish_many_eps", "≥ 50 000 ev/s", lambda v: v >= 50_000, 50_000, False, "ev/s"),
    Target("relay throughput, one relay", "relay.1.eps", "≥ 20 000 ev/s", lambda v: v >= 20_000, 20_000, False, "ev/s"),
    Target("resume of 10 000 missed events", "resume.ms", "≤ 1 s", lambda v: v <= 1000, 1000, True, "ms"),
    Target(
        "idle peers on one edge: RSS each",
        "conn.kb_per_conn",
        "≤ 50 KB (at 10 000 peers)",
        lambda v: v <= 50,
        50,
        True,
        "KB",
    ),
    Target("idle peers on one edge: count", "conn.connected", "10 000", lambda v: v >= 10_000, 10_000, False, "peers"),
    Target("connect storm, 10 000 peers onto one edge", "conn.storm_s", "≤ 10 s", lambda v: v <= 10, 10, True, "s"),
    Target(
        "storm after an edge kill: kill → 20 000 peers back",
        "conn.kill.back_s",
        "≤ 15 s",
        lambda v: v <= 15,
        15,
        True,
        "s",
    ),
    Target("storm after an edge kill: events lost", "conn.kill.lost", "0", lambda v: v == 0, 0, True, "events"),
    Target("idle peers on one edge: edge CPU", "conn.idle_cpu_pct", "≤ 3 % of a core", lambda v: v <= 3, 3, True, "%"),
]


def fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,} {unit}".replace(",", " ").strip()
    if isinstance(v, float):
        if abs(v) >= 100:
            s = f"{v:,.0f}".replace(",", " ")
        elif abs(v) >= 10:
            s = f"{v:.1f}"
        else:
            s = f"{v:.2f}"
        return f"{s} {unit}".strip()
    return str(v)


def verdict(t: Target, v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "not measured"
    if t.met(v):
        return "**met**"
    if t.limit == 0:
        return f"**missed** ({fmt(v)} lost)"
    factor = v / t.limit if t.lower_is_better else t.limit / max(v, 1e-9)
    return f"**missed** ({factor:.1f}× off)"


def ratio(a: Any, b: Any) -> str:
    try:
        if a is None or b is None or b == 0 or a != a or b != b:
            return "–"
        return f"{a / b:.2f}"
    except TypeError:
        return "–"


def median_figures(runs: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    out: dict[str, tuple[float, int]] = {}
    keys = {k for r in runs for k in r}
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)]
        vals = [v for v in vals if v == v]
        if vals:
            out[k] = (statistics.median(vals), len(vals))
    return out


def render(latest: dict[str, Any], med: dict[str, tuple[float, int]], runs: list[str]) -> str:
    L: list[str] = []
    L.append(f"### Targets (latest run; median over the last {len(runs)} archived run(s))\n")
    if runs:
        L.append("Runs: " + ", ".join(runs) + "\n")
    L.append("| figure | target | latest | median (n) | verdict (on the median) |")
    L.append("| --- | --- | ---: | ---: | --- |")
    for t in TARGETS:
        v = latest.get(t.key)
        m = med.get(t.key)
        basis = m[0] if m else v
        L.append(
            f"| {t.figure} | {t.target} | {fmt(v, t.unit)} | "
            f"{fmt(m[0], t.unit) + f' ({m[1]})' if m else '–'} | {verdict(t, basis)} |"
        )
    L.append("\n### Device-targeted latency, ms (latest run; lost = not arrived 10 s after sending)\n")
    L.append(
        "| rate ev/s | ours p50 | p90 | p99 | max | lost | raw Channels p50 | p99 | lost "
        "| Socket.IO+PG p50 | p99 | lost |"
    )
    L.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rates = sorted(
        {
            int(k.split(".")[1])
            for k in latest
            if k.split(".")[0] in ("e2e", "floor", "sio") and k.split(".")[1].isdigit()
        }
    )
    for rate in rates:
        cells = [
            fmt(latest.get(f"{system}.{rate}.{stat}"))
            for system, stats in (
                ("e2e", ("p50_ms", "p90_ms", "p99_ms", "max_ms", "lost")),
                ("floor", ("p50_ms", "p99_ms", "lost")),
                ("sio", ("p50_ms", "p99_ms", "lost")),
            )
            for stat in stats
        ]
        L.append(f"| {rate} | " + " | ".join(cells) + " |")
    L.append("\n### Ratios, ours ÷ theirs (latest run; > 1 means ours is slower / higher, except rates)\n")
    L.append("| figure | ours | raw Channels floor | ours ÷ floor | Socket.IO+PG | ours ÷ Socket.IO |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for rate in RATES:
        for stat in ("p50_ms", "p99_ms"):
            o, fl, s = (
                latest.get(f"e2e.{rate}.{stat}"),
                latest.get(f"floor.{rate}.{stat}"),
                latest.get(f"sio.{rate}.{stat}"),
            )
            L.append(
                f"| {stat[:3]} at {rate} ev/s (ms) | {fmt(o)} | {fmt(fl)} | {ratio(o, fl)} | {fmt(s)} | {ratio(o, s)} |"
            )
    o, fl, s = latest.get("e2e.max_rate"), latest.get("floor.max_rate"), latest.get("sio.max_rate")
    L.append(f"| max sustainable rate (ev/s) | {fmt(o)} | {fmt(fl)} | {ratio(o, fl)} | {fmt(s)} | {ratio(o, s)} |")
    for key, label in (
        ("deliveries_per_s", "fan-out deliveries/s"),
        ("p50_ms", "fan-out p50 (ms)"),
        ("p99_ms", "fan-out p99 (ms)"),
        ("ceiling_dps", "fan-out ceiling, deliveries/s (p99 ≤ 1 s)"),
    ):
        o, s = latest.get(f"fanout.{key}"), latest.get(f"sio.fanout.{key}")
        L.append(f"| {label} | {fmt(o)} | – | – | {fmt(s)} | {ratio(o, s)} |")
    o, s = latest.get("kill.lost_pct"), latest.get("sio.kill.lost_pct")
    L.append(f"| events lost, edge SIGKILL (%) | {fmt(o)} | – | – | {fmt(s)} | – |")
    L.append("\n### Other figures (latest run)\n")
    for key, label, unit in (
        ("relay.2.eps", "relay throughput, two relays (shards 0-7, 8-15)", "ev/s"),
        ("resume.recovered", "resume recovered every time", ""),
        ("conn.storm_s", "connect storm, time to all connected", "s"),
        ("conn.connects_per_s", "connect storm, handshakes/s", "/s"),
        ("conn.kill.back_s", "storm after an edge kill, kill → every peer back", "s"),
        ("conn.kill.back_within_15s", "storm after an edge kill, peers back within 15 s", "peers"),
        ("e2e.connect_s", "1000 peers connecting to 2 edges", "s"),
        ("fanout.ceiling_p99_ms", "fan-out ceiling: p99 at the highest passing rate", "ms"),
        ("sio.fanout.ceiling_p99_ms", "Socket.IO fan-out ceiling: p99 at its highest passing rate", "ms"),
    ):
        L.append(f"- {label}: {fmt(latest.get(key), unit)}")
    return "\n".join(L)


def details(folder: Path) -> str:
    """Every phase of one run with the CPU of every process (CPU-seconds over the phase)."""
    L: list[str] = []

    def cpu(r: dict[str, Any], keys: tuple[str, ...]) -> str:
        c = r.get("cpu") or {}
        return " | ".join(fmt(c.get(k)) for k in keys)

    if (e2e := _load(folder, "e2e_latency")) is not None:
        L.append("\n#### Device events: e2e (through the outbox) and the raw Channels floor\n")
        L.append(
            "| phase | rate | sent | lost | p50 | p90 | p99 | max ms | recv/s | ok | wall s | CPU-s: edges | relay | "
            "PostgreSQL | Redis | producers/senders | load clients | others |"
        )
        L.append("|" + " --- |" * 2 + " ---: |" * 16)
        for r in e2e["rows"]:
            L.append(
                f"| {r['phase']} | {fmt(r['rate'])} | {fmt(r['sent'])} | {fmt(r['lost'])} | {fmt(r['p50_ms'])} | "
                f"{fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {fmt(r['recv_rate'])} | "
                f"{fmt(r['ok'])} | "
                + cpu(r, ("wall_s", "edges", "relay", "postgres", "redis", "senders", "peers", "other"))
                + " |"
            )
        stages = [r for r in e2e["rows"] if r["phase"] == "e2e"]
        L.append(
            "\nMedian time per stage (ms): "
            + "; ".join(
                f"{fmt(r['rate'])}/s: commit→assigned {fmt(r.get('p50_to_assigned_ms'))}, "
                f"assigned→peer {fmt(r.get('p50_assigned_to_peer_ms'))}"
                for r in stages
            )
            + "."
        )
    singles = (
        (
            "fanout",
            "Fan-out (the first row; then the ceiling search)",
            ("rate", "recipients", "expected", "received", "deliveries_per_s", "p50_ms", "p99_ms", "ok"),
        ),
        (
            "edge_kill",
            "Edge SIGKILL",
            ("rate", "sent", "lost", "out_of_order", "peers_resumed", "kill_to_resumed_p50_ms"),
        ),
    )
    for name, title, cols in singles:
        if (data := _load(folder, name)) is None:
            continue
        L.append(f"\n#### {title}\n")
        keys = ("wall_s", "edges", "relay", "postgres", "redis", "senders", "peers", "other")
        L.append("| " + " | ".join(cols) + " | CPU-s: " + " | ".join(keys) + " |")
        L.append("|" + " ---: |" * (len(cols) + len(keys)))
        for r in data["rows"]:  # the fan-out: its rate, then the ceiling search's
            L.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " | " + cpu(r, keys) + " |")
    if (res := _load(folder, "resume")) is not None:
        L.append("\n#### Resume of 10 000 missed events (3 runs)\n")
        L.append(
            "| run | replayed | connect→hello ms | resume→resumed ms | connect→resumed ms | CPU-s edges | PostgreSQL |"
        )
        L.append("|" + " ---: |" * 7)
        for r in res["rows"]:
            L.append(
                f"| {r['run']} | {fmt(r['replayed'])} | {fmt(r['connect_to_hello_ms'])} | "
                f"{fmt(r['resume_to_resumed_ms'])} | {fmt(r['connect_to_resumed_ms'])} | "
                f"{fmt(r['cpu'].get('edges'))} | {fmt(r['cpu'].get('postgres'))} |"
            )
    if (prod := _load(folder, "producer")) is not None:
        L.append("\n#### Producer\n")
        L.append("| figure | p50 ms | p99 ms | mean ms | + % (mean) | events/s | CPU-s: this process | PostgreSQL |")
        L.append("| --- |" + " ---: |" * 7)
        for r in prod["rows"]:
            L.append(
                f"| {r['figure']} | {fmt(r.get('p50_ms'))} | {fmt(r.get('p99_ms'))} | {fmt(r.get('mean_ms'))} | "
                f"{fmt(r.get('overhead_pct'))} | {fmt(r.get('events_per_sec'))} | {fmt(r.get('cpu_bench'))} | "
                f"{fmt(r.get('cpu_postgres'))} |"
            )
        L.append(
            f"\n`publish()` overhead (mean): {prod['publish_overhead'] * 100:.0f} % "
            "(the floors: what one more statement, and the smallest append sent inside the COMMIT, cost)."
        )
    if (relay := _load(folder, "relay_throughput")) is not None:
        L.append("\n#### Relay throughput\n")
        L.append("| figure | events | s | events/s | CPU-s: relays | PostgreSQL | Redis | others |")
        L.append("| --- |" + " ---: |" * 7)
        for r in relay["rows"]:
            L.append(
                f"| {r['figure']} | {fmt(r['events'])} | {fmt(r['secs'])} | {fmt(r['events_per_sec'])} | "
                f"{fmt(r.get('cpu_relays'))} | {fmt(r.get('cpu_postgres'))} | {fmt(r.get('cpu_redis'))} | "
                f"{fmt(r.get('cpu_other'))} |"
            )
    conn = _load(folder, "connections")
    one = [r for r in conn["rows"] if r.get("phase", "one edge") == "one edge"] if conn else []
    if one:
        r = one[0]
        L.append("\n#### Connections (one edge)\n")
        L.append(
            "| peers | connected | retried handshakes | storm s | handshakes/s | edge RSS before → after MB | "
            "KB per connection | Redis KB per connection | edge CPU idle | CPU-s in the storm: edge | PostgreSQL | "
            "load clients |"
        )
        L.append("|" + " ---: |" * 12)
        sc = r["storm_cpu"]
        L.append(
            f"| {fmt(r['peers'])} | {fmt(r['connected'])} | {fmt(r.get('retries'))} | {fmt(r['storm_s'])} | "
            f"{fmt(r['connects_per_s'])} | {fmt(r['rss_before_mb'])} → {fmt(r['rss_after_mb'])} | "
            f"{fmt(r['kb_per_conn'])} | {fmt(r['redis_kb_per_conn'])} | {fmt(r['edge_idle_cpu_pct'])} % | "
            f"{fmt(sc.get('edge'))} | {fmt(sc.get('postgres'))} | {fmt(sc.get('peers'))} |"
        )
    if (scale := _load(folder, "scale")) is not None:
        L.append("\n#### Scale by size (one edge, 10 % of the peers receiving)\n")
        L.append(
            "| peers | phase | receivers | ev/s | lost | p50 ms | p99 ms | edge CPU % | edge µs per frame | "
            "above idle | ok |"
        )
        L.append("| ---: | --- |" + " ---: |" * 9)
        for r in scale["rows"]:
            L.append(
                f"| {fmt(r['peers'])} | {r['phase']} | {fmt(r.get('receivers'))} | {fmt(r.get('rate'))} | "
                f"{fmt(r.get('lost'))} | {fmt(r.get('p50_ms'))} | {fmt(r.get('p99_ms'))} | {fmt(r['edge_cpu_pct'])} | "
                f"{fmt(r.get('edge_us_per_frame'))} | {fmt(r.get('edge_us_per_frame_above_idle'))} | {fmt(r['ok'])} |"
            )
    if (ft := _load(folder, "fanout_trace")) is not None:
        L.append("\n#### Fan-out split (1000 peers × 100 ev/s, traced): the engine's part against the peers' arrival\n")
        L.append(
            "| rate | commit → rows p50 / p99 | received → written p50 | commit → written p50 / p99 | "
            "commit → peer p50 / p99 | engine share p50 / p99 | run-queue ms/s: edges | relay | load clients |"
        )
        L.append("|" + " ---: |" * 9)
        for r in ft["rows"]:
            st = r["steps"]
            # Older runs had no such step: the sum of the two medians stands in.
            burst = (st.get("received_to_written") or {}).get("p50")
            if burst is None:
                burst = st["received_to_offered"]["p50"] + st["offered_to_written"]["p50"]
            L.append(
                f"| {fmt(r['rate'])} | {fmt(st['commit_to_rows']['p50'])} / {fmt(st['commit_to_rows']['p99'])} | "
                f"{fmt(burst)} | {fmt(st['commit_to_written']['p50'])} / {fmt(st['commit_to_written']['p99'])} | "
                f"{fmt(r['p50_ms'])} / {fmt(r['p99_ms'])} | {fmt(r['engine_share_p50'])} / "
                f"{fmt(r['engine_share_p99'])} | {fmt(r.get('runq_edges_ms_per_s'))} | "
                f"{fmt(r.get('runq_relay_ms_per_s'))} | {fmt(r.get('runq_clients_ms_per_s'))} |"
            )
    if (sio := _load(folder, "socketio")) is not None:
        L.append("\n#### Socket.IO 4 + PostgreSQL adapter (same run; CPU in % of one core, its harness)\n")
        L.append(
            "| phase | rate | sent | lost | p50 | p90 | p99 | max ms | recv/s | ok | CPU % servers | producer | "
            "clients | PostgreSQL | machine (of 2 cores) |"
        )
        L.append("| --- |" + " ---: |" * 14)
        for r in sio["rows"]:
            L.append(
                f"| {r['phase']} | {fmt(r['rate'])} | {fmt(r['sent'])} | {fmt(r['lost'])} | {fmt(r['p50_ms'])} | "
                f"{fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {fmt(r['recv_rate'])} | "
                f"{fmt(r['ok'])} | {r['cpu_servers_pct']} | {fmt(r['cpu_producer_pct'])} | "
                f"{fmt(r['cpu_clients_pct'])} | {fmt(r['cpu_postgres_pct'])} | {fmt(r['cpu_machine_pct'])} |"
            )
    return "\n".join(L)


def _commit(folder: Path) -> str:
    for name in ("e2e_latency", "producer", "relay_throughput", "connections"):
        if data := _load(folder, name):
            return str(data.get("machine", {}).get("commit", "?"))
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="archived runs to take medians over")
    args = parser.parse_args()
    latest = figures(common.RESULTS)
    folders = sorted(p for p in HISTORY.iterdir() if p.is_dir()) if HISTORY.exists() else []
    chosen = folders[-args.runs :]
    runs = [figures(p) for p in chosen]
    med = median_figures(runs)
    md = render(latest, med, [f"{p.name} (code {_commit(p)})" for p in chosen])
    md += "\n\n### Every phase of the latest run\n" + details(common.RESULTS)
    print(md)
    (common.RESULTS / "summary.md").write_text(md + "\n")
    (common.RESULTS / "summary.json").write_text(
        json.dumps({"latest": latest, "median": {k: v[0] for k, v in med.items()}, "runs": len(runs)}, indent=2)
    )


if __name__ == "__main__":
    main()
