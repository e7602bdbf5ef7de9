"""bench/scale.py's instruments (decision 0043): run-queue waits read from schedstat
(``common.runq_seconds``, which fanout_trace.py reads too), the slowest events matched with
their load client's own stalls and with the edge's heartbeats, and bench/peers.js's probe
(BENCH_PEERS_PROBE) reporting its stalls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import scale  # noqa: E402


def test_runq_seconds__reads_this_process_and_skips_a_gone_one() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.5: pass"])
    try:
        mine = common.runq_seconds([os.getpid(), busy.pid])
        assert mine >= common.runq_seconds([os.getpid()]) >= 0.0
    finally:
        busy.wait()
    assert common.runq_seconds([busy.pid]) == 0.0  # reaped: no /proc entry


def test_runq_seconds__adds_the_run_queue_field_of_every_thread(tmp_path: Path) -> None:
    # schedstat: on-CPU ns, run-queue ns, timeslices; two threads of process 5, one of 6.
    for pid, tid, line in ((5, 5, "900000000 250000000 7"), (5, 8, "1 500000000 2"), (6, 6, "0 1000000 1")):
        (tmp_path / str(pid) / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / str(pid) / "task" / str(tid) / "schedstat").write_text(line + "\n")
    assert common.runq_seconds([5], proc=tmp_path) == 0.75
    assert common.runq_seconds([5, 6, 7], proc=tmp_path) == 0.751  # 7: gone


def test_hop_trace_dir__set_for_the_block_then_removed_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TYRUM_HOP_TRACE", "before")
    monkeypatch.delenv("HOP_TRACE_KEEP", raising=False)
    with common.hop_trace_dir("unit-trace") as path:
        assert path.is_dir() and os.environ["TYRUM_HOP_TRACE"] == str(path)
        (path / "edge-1.jsonl").write_text("{}\n")
    assert not path.exists() and os.environ["TYRUM_HOP_TRACE"] == "before"
    monkeypatch.setenv("HOP_TRACE_KEEP", "1")
    monkeypatch.delenv("TYRUM_HOP_TRACE")
    with common.hop_trace_dir("unit-trace") as kept:
        pass
    assert kept.is_dir() and "TYRUM_HOP_TRACE" not in os.environ
    shutil.rmtree(kept)


def test_tail_probe__slow_events_matched_with_their_own_clients_stalls() -> None:
    sent = {f"e{i}": 100.0 for i in range(100)}
    arrivals = {f"e{i}": 100.001 for i in range(100)}
    arrivals["e0"] = 100.050  # slow, in pool 1's 20 ms stall ending at 100.049
    arrivals["e1"] = 100.040  # slow, read by pool 0, which did not stall
    got = {
        "arrivals": arrivals,
        "pool_of": {e: (1 if e == "e0" else 0) for e in arrivals},
        "probes": [{"gcs": [], "stalls": []}, {"gcs": [[100.049, 20.0, 4]], "stalls": [[100.049, 21.0]]}],
    }
    tail = scale.tail_probe(got, sent)
    assert tail["slow"] == 2
    assert tail["slow_in_client_stall"] == 1
    assert tail["client_gc_max_ms"] == [0, 20.0]
    assert tail["client_stalls_over_5ms"] == [0, 1]


def test_beat_overlap__slow_events_in_flight_after_a_beat_against_all() -> None:
    sent = {f"e{i}": 100.0 + i * 0.01 for i in range(1000)}  # 100.00 … 109.99, 1–2 ms each
    arrivals = {e: t + 0.001 + i * 1e-6 for i, (e, t) in enumerate(sent.items())}
    for e in ("e500", "e501"):  # committed at 105.00 / 105.01, held 40 ms: in flight after the beat at 105.0
        arrivals[e] = sent[e] + 0.040
    arrivals["e100"] = sent["e100"] + 0.030  # slow, far from any beat
    out = scale.beat_overlap(arrivals, sent, [105.0])
    assert out["beats"] == 1
    # slowest 1 % (11): the three held ones and the last 8 (far from the beat); committed in
    # [105.0, 105.5]: 51 of 1000
    assert out["all_near_beat"] == 0.051
    assert out["slow_near_beat"] == round(2 / 11, 3)
    assert scale.beat_overlap(arrivals, sent, []) == {"beats": 0}


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    return node


def _collect(env: dict[str, str], block_first: bool = False) -> dict[str, object]:
    """One ``collect``'s answer; ``block_first``: a collect whose ``sent`` (500 000 ids) takes
    the loop a while to parse comes before it — a stall the probe's timer notes after it."""
    proc = subprocess.Popen(
        [_node(), str(BENCH / "peers.js")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "NODE_OPTIONS": "", "BENCH_PEERS_WS": "raw", **env},
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(sent: dict[str, float]) -> dict[str, object]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"cmd": "collect", "sent": sent}) + "\n")
        proc.stdin.flush()
        return dict(json.loads(proc.stdout.readline()))

    with proc:
        try:
            if block_first:
                ask({f"event-{i:09d}": 1.0 for i in range(500_000)})
                time.sleep(0.1)  # the probe's next tick, late
            answer = ask({})
            proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            proc.stdin.flush()
            proc.wait(30)
            return answer
        finally:
            if proc.poll() is None:
                proc.kill()


def test_peers_js__no_probe_unless_asked() -> None:
    assert "probe" not in _collect({}, block_first=True)


def test_peers_js__probe_reports_the_loops_stall_in_epoch_seconds() -> None:
    before = time.time()
    probe = _collect({"BENCH_PEERS_PROBE": "1"}, block_first=True)["probe"]
    assert isinstance(probe, dict)
    assert set(probe) == {"gcs", "stalls"}
    assert probe["stalls"], "parsing 500 000 ids held the loop: a stall"
    assert all(before <= end <= time.time() and late >= 2 for end, late in probe["stalls"])
    assert all(before <= end <= time.time() and ms >= 1 for end, ms, _ in probe["gcs"])
