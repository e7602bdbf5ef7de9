"""The checker itself, on made-up records (no services): it must see every kind of failure
the matrix exists to catch, or a green matrix would mean nothing."""

from __future__ import annotations

import uuid

from backplane import streams
from faults.checker import Checker, Got, PeerRecord, Row, Session

TENANT = str(uuid.UUID(int=1))
OTHER = str(uuid.UUID(int=2))
EPOCH = "e0e0e0e0"


def keys(tenant: str = TENANT, device: str = "dev-1", role: str = "client") -> dict[str, str]:
    return streams.connection_streams(uuid.UUID(tenant), role, device)


def peer(*sessions: Session) -> PeerRecord:
    record = PeerRecord("p0", "acme", TENANT, "dev-1", "client", keys())
    record.sessions = list(sessions) or [hello()]
    return record


def hello(connection: str = "c1", t: float = 0.0, device: int = 0, resume_from: dict | None = None) -> Session:
    heads = {"tenant": (EPOCH, 0), "role": (EPOCH, 0), "device": (EPOCH, device)}
    return Session(connection, "edge-a", t, heads, resume_from or {})


def rows(n: int, stream: str = "device", tenant: str = TENANT) -> dict[str, Row]:
    key = keys(tenant)[stream]
    return {f"{tenant[-1]}{stream[0]}{i}": Row(f"{tenant[-1]}{stream[0]}{i}", tenant, key, i, EPOCH, True)
            for i in range(1, n + 1)}


def got(row: Row, stream: str = "device", t: float = 1.0, tenant: str = "acme", replayed: bool = False) -> Got:
    return Got(row.event_id, stream, row.epoch, int(row.offset or 0), replayed, t, "c1", tenant)


def checker(record: PeerRecord, truth: dict[str, Row]) -> Checker:
    c = Checker("unit")
    c.peers, c.truth = [record], truth
    for s in record.sessions:  # what the wire carried, unless a test says otherwise
        if not s.frames:
            s.frames = [(g.stream, g.epoch, g.offset, g.event_id) for g in record.got
                        if g.connection_id == s.connection_id]
    return c


def test_checker__all_delivered_passes() -> None:
    truth = rows(3)
    record = peer()
    record.got = [got(r) for r in truth.values()]
    c = checker(record, truth)
    assert c.failures() == []
    assert c.report["expected"] == 3 and c.report["lost"] == 0


def test_checker__a_missing_event_is_lost() -> None:
    truth = rows(3)
    record = peer()
    record.got = [got(truth["1d1"]), got(truth["1d3"])]
    c = checker(record, truth)
    c.verify()
    assert c.report["lost"] == 1 and c.report["per_peer"][0]["lost_ids"] == ["1d2"]
    assert c.report["wire_violations"] == 1  # 1 then 3 on one connection
    assert any(f.startswith("lost: 1") for f in c.failures())


def test_checker__events_before_the_first_hello_are_not_owed() -> None:
    truth = rows(3)
    record = peer(hello(device=2))
    record.got = [got(truth["1d3"])]
    c = checker(record, truth)
    assert c.failures() == []
    assert c.report["expected"] == 1


def test_checker__an_unassigned_committed_event_is_lost() -> None:
    truth = rows(1)
    truth["late"] = Row("late", TENANT, keys()["device"], None, EPOCH, False)
    record = peer()
    record.got = [got(truth["1d1"])]
    c = checker(record, truth)
    failures = c.failures()
    assert c.report["lost"] == 1 and c.report["unassigned"] == 1, failures


def test_checker__out_of_order_is_an_order_violation() -> None:
    truth = rows(2)
    record = peer()
    record.got = [got(truth["1d2"], t=1.0), got(truth["1d1"], t=2.0)]
    c = checker(record, truth)
    c.verify()
    assert c.report["order_violations"] == 1
    assert c.failures()


def test_checker__another_tenants_event_is_cross_tenant() -> None:
    truth = {**rows(1), **rows(1, tenant=OTHER)}
    record = peer()
    record.got = [got(truth["1d1"]), got(truth["2d1"], tenant="other")]
    c = checker(record, truth)
    c.verify()
    assert c.report["cross_tenant"] == 1
    assert any(f.startswith("cross_tenant") for f in c.failures())


def test_checker__an_event_of_another_device_is_misrouted() -> None:
    truth = rows(1)
    other_device = Row("x", TENANT, keys(device="dev-2")["device"], 1, EPOCH, True)
    truth["x"] = other_device
    record = peer()
    record.got = [got(truth["1d1"]), got(other_device)]
    c = checker(record, truth)
    c.verify()
    assert c.report["misrouted"] == 1 and c.failures()


def test_checker__a_wrong_offset_is_a_mismatch() -> None:
    truth = rows(1)
    record = peer()
    record.got = [Got("1d1", "device", EPOCH, 7, False, 1.0, "c1", "acme")]
    c = checker(record, truth)
    c.verify()
    assert c.report["offset_mismatch"] == 1 and c.failures()


def test_checker__a_resume_from_the_wrong_offset_or_an_oversized_replay_fails() -> None:
    truth = rows(5)
    first, second = hello("c1", 0.0), hello("c2", 5.0, device=5, resume_from={"device": (EPOCH, 0)})
    second.resumed = {"device": {"recovered": True, "replayed": 5}}
    record = peer(first, second)
    record.got = [got(truth["1d1"], t=1.0), got(truth["1d2"], t=1.1)]
    record.got += [Got(r.event_id, "device", EPOCH, int(r.offset or 0), True, 6.0, "c2", "acme")
                   for r in list(truth.values())[2:]]
    first.frames = [("device", EPOCH, 1, "1d1"), ("device", EPOCH, 2, "1d2")]
    second.frames = [("device", EPOCH, o, f"1d{o}") for o in range(1, 6)]  # a whole window again
    c = checker(record, truth)
    c.verify()
    assert c.report["resume_mismatch"] == 1  # the SDK had 2, it resumed from 0
    assert c.report["replay_excess"] == 0  # 5 replayed for 5 missed (from 0): consistent, but…
    assert c.failures()


def test_checker__a_resync_or_a_dead_sdk_fails() -> None:
    truth = rows(1)
    record = peer()
    record.got = [got(truth["1d1"])]
    record.resyncs = ["device:retention_exceeded"]
    record.error = "TokenRevoked: edge closed the connection with 4008"
    c = checker(record, truth)
    failures = c.failures()
    assert any(f.startswith("resyncs") for f in failures) and any(f.startswith("errors") for f in failures)


def test_checker__recovery_is_measured_from_the_faults_end() -> None:
    truth = rows(2)
    record = peer()
    record.got = [got(truth["1d1"], t=10.1), got(truth["1d2"], t=14.0)]
    c = checker(record, truth)
    c.journal = [{"id": "1d1", "t": 10.0}, {"id": "1d2", "t": 11.0}]
    c.fault("stall", 10.5, 12.0)
    c.verify()
    assert c.report["faults"][0]["recovery_s"] == 2.0  # 1d2 committed during the fault, came at 14
    assert c.report["latency_max_s"] == 3.0
    assert "recovery=2.000s" in c.summary()
