"""bench/fanout_trace.py's join: each (event, edge) pair that the relay and that edge traced
gives one time per step, measured from the producer's commit; the edges stay apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import fanout_trace  # noqa: E402


def write(path: Path, role: str, recs: list[tuple[dict[str, float], list[list[object]]]]) -> None:
    path.write_text("".join(json.dumps({"role": role, "t": t, "rows": rows}) + "\n" for t, rows in recs))


def test_read_traces__keeps_each_edge_apart_takes_the_relay_from_every_file_and_skips_the_rings(tmp_path: Path) -> None:
    # The relay's lines land in the file of whichever of its roles flushed them.
    write(tmp_path / "relay-10.jsonl", "relay", [({"assigned": 1.0}, [["t:a", 1]])])
    write(tmp_path / "bell-10.jsonl", "relay", [({"assigned": 1.0}, [["t:a", 2]])])
    with (tmp_path / "bell-10.jsonl").open("a") as out:
        out.write(json.dumps({"role": "bell", "t": {"rung": 0.5}, "rows": [["t:a", 3]]}) + "\n")
    write(tmp_path / "edge-20.jsonl", "edge", [({"written": 1.004}, [["t:a", 1]])])
    write(tmp_path / "edge-30.jsonl", "edge", [({"written": 1.009}, [["t:a", 1]])])
    write(tmp_path / "edge-99.jsonl", "edge", [({"written": 9.0}, [["t:a", 1]])])  # not this cluster's
    relay, edges = fanout_trace.read_traces(tmp_path, [30, 20])
    assert relay == {("t:a", 1): {"assigned": 1.0}, ("t:a", 2): {"assigned": 1.0}}
    assert edges == [{("t:a", 1): {"written": 1.009}}, {("t:a", 1): {"written": 1.004}}]


def test_join__one_time_per_event_and_edge_from_the_commit() -> None:
    relay = {("t:a", 1): {"assigned": 10.001}, ("t:a", 2): {"assigned": 10.011}}
    steps = {"read": 10.0015, "received": 10.0016, "offered": 10.003, "written": 10.005}
    edges = [{("t:a", 1): steps}, {("t:a", 1): {**steps, "written": 10.007}, ("t:a", 2): {"written": 10.02}}]
    events = [("e1", "t:a", 1), ("e2", "t:a", 2), ("e3", "t:a", 3)]
    per_step, traced = fanout_trace.join(relay, edges, events, {"e1": 10.0, "e2": 10.01, "e3": 10.02})
    assert traced == 3  # e1 on both edges, e2 on the second; e3 was never traced
    assert [round(v, 3) for v in per_step["commit_to_written"]] == [5.0, 7.0, 10.0]
    assert [round(v, 3) for v in per_step["commit_to_rows"]] == [1.0, 1.0, 1.0]
    assert [round(v, 3) for v in per_step["offered_to_written"]] == [2.0, 4.0]  # e2's edge noted no offer


def test_runq_between__the_samples_nearest_the_window_ms_per_second() -> None:
    samples = [(10.0, {"edges": 1.0}), (10.2, {"edges": 1.1}), (11.2, {"edges": 1.4}), (11.4, {"edges": 2.0})]
    # 10.25 → the 10.2 sample, 11.15 → the 11.2 one: 0.3 s of waiting in 1.0 s
    assert {k: round(v, 6) for k, v in fanout_trace.runq_between(samples, 10.25, 11.15).items()} == {"edges": 300.0}
    assert fanout_trace.runq_between(samples[:1], 10.0, 11.0) == {}
