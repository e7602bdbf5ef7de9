"""The relay's claim floor (backplane.claims): when it may move, and when it must not."""

from __future__ import annotations

from backplane.claims import ClaimFloor

LIMIT = 100


def started(full_scan_secs: float = 1000.0) -> ClaimFloor:
    floor = ClaimFloor(full_scan_secs)
    assert floor.bound([0, 1], now=0.0) == 0  # the first claim: from the lowest id
    return floor


def test_floor__moves_to_a_candidate_once_every_older_transaction_ended_and_a_claim_was_whole() -> None:
    floor = started()
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    assert (floor.after, floor.candidate) == (0, (40, 510))
    floor.observe(xmin=505, seq=45, xid=520, claimed=1, limit=LIMIT, whole=True)  # 505: 510's elders may run
    assert floor.after == 0
    floor.observe(xmin=511, seq=50, xid=530, claimed=2, limit=LIMIT, whole=True)
    assert floor.after == 40  # every row up to 40 came from a transaction older than 510: all ended
    assert floor.candidate == (50, 530)  # the next one, from this call
    assert floor.bound([1, 0], now=1.0) == 40


def test_floor__stays_after_a_full_batch_a_partial_claim_or_a_claim_with_tenants_left_out() -> None:
    floor = started()
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    floor.observe(xmin=600, seq=90, xid=610, claimed=LIMIT, limit=LIMIT, whole=True)  # more may wait
    floor.observe(xmin=600, seq=90, xid=610, claimed=0, limit=LIMIT, whole=False)  # quarantined tenants
    floor.observe(xmin=None, seq=None, xid=None, claimed=0, limit=LIMIT, whole=True)  # no reading
    assert floor.after == 0 and floor.candidate == (40, 510)
    floor.observe(xmin=600, seq=90, xid=None, claimed=0, limit=LIMIT, whole=True)  # nothing claimed: whole
    assert floor.after == 40 and floor.candidate is None  # no transaction id: no new candidate


def test_floor__never_falls_and_starts_over_for_other_shards() -> None:
    floor = started()
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    floor.observe(xmin=511, seq=30, xid=520, claimed=0, limit=LIMIT, whole=True)
    floor.observe(xmin=521, seq=35, xid=530, claimed=0, limit=LIMIT, whole=True)
    assert floor.after == 40  # a lower candidate (seq read on another path) does not lower it
    assert floor.bound([0, 1, 2], now=1.0) == 0  # a shard more: nothing is known of its rows
    assert (floor.after, floor.candidate) == (0, None)


def test_floor__a_full_scan_every_period_whatever_the_floor() -> None:
    floor = started(full_scan_secs=10.0)
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    floor.observe(xmin=511, seq=50, xid=520, claimed=0, limit=LIMIT, whole=True)
    assert [floor.bound([0, 1], now=t) for t in (1.0, 9.9, 10.0, 10.1, 19.9, 20.0)] == [40, 40, 0, 40, 40, 0]
