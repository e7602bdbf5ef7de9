"""bench/common.py's CPU meter: processes that report their own CPU (the senders, their
PostgreSQL backends, their start-up) are counted once, in their role, not as "other"."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def snap(t: float, postgres: dict[int, float], machine: float, self_cpu: float = 0.0) -> dict[str, object]:
    return {"t": t, "pids": {}, "redis": 0.0, "postgres": postgres, "self": self_cpu, "machine": machine}


def test_delta__a_reported_backend_is_counted_once_and_the_rest_is_other() -> None:
    meter = common.CpuMeter(None, {})
    a = snap(0.0, {1: 10.0, 7: 1.0}, machine=100.0)
    # Backend 7 (a sender's) is still there at b: its snapshot is left out, its report counted.
    b = snap(5.0, {1: 12.0, 7: 3.5}, machine=109.0, self_cpu=0.5)
    out = meter.delta(a, b, {"senders": 3.0, "postgres": 2.5, "bench": 1.0}, reported={7})
    assert out["postgres"] == 4.5  # backend 1's 2.0 and the reported 2.5, not 2.5 twice
    assert out["bench"] == 1.5  # the driver's own 0.5 and the senders' start-up
    assert out["other"] == 0.0  # 9.0 busy = 3.0 + 4.5 + 1.5


def test_delta__without_reports_a_gone_backend_is_other() -> None:
    meter = common.CpuMeter(None, {})
    out = meter.delta(snap(0.0, {1: 10.0}, 100.0), snap(5.0, {1: 11.0}, 104.0))
    assert out["postgres"] == 1.0 and out["other"] == 3.0


def test_delta__the_relay_backends_are_a_part_of_postgres_not_added_to_it() -> None:
    meter = common.CpuMeter(None, {})
    a = {**snap(0.0, {1: 10.0, 2: 5.0}, machine=100.0), "relay_backends": {2}}
    # Backend 2 (the relay's lease session) used 1.5 of PostgreSQL's 2.5; a relay backend seen
    # only at b (a new lease session) counts from zero.
    b = {**snap(5.0, {1: 11.0, 2: 6.5, 3: 0.25}, machine=102.75), "relay_backends": {2, 3}}
    out = meter.delta(a, b)
    assert out["postgres"] == 2.75
    assert out["postgres_relay"] == 1.75
    assert out["postgres_others"] == 1.0
    assert out["other"] == 0.0  # counted once: 2.75 busy, all PostgreSQL's


def test_delta__a_reported_backend_is_never_the_relays() -> None:
    meter = common.CpuMeter(None, {})
    a = {**snap(0.0, {2: 5.0, 7: 1.0}, machine=100.0), "relay_backends": {2}}
    b = {**snap(5.0, {2: 6.0, 7: 3.0}, machine=105.0), "relay_backends": {2, 7}}
    out = meter.delta(a, b, {"postgres": 2.0}, reported={7})
    assert out["postgres"] == 3.0 and out["postgres_relay"] == 1.0 and out["postgres_others"] == 2.0
