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


def test_floor__stays_after_a_claim_with_tenants_left_out_or_without_a_reading() -> None:
    floor = started()
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    floor.observe(xmin=600, seq=90, xid=610, claimed=0, limit=LIMIT, whole=False)  # quarantined tenants
    floor.observe(xmin=None, seq=None, xid=None, claimed=0, limit=LIMIT, whole=True)  # no reading
    assert floor.after == 0 and floor.candidate == (40, 510)
    floor.observe(xmin=600, seq=90, xid=None, claimed=0, limit=LIMIT, whole=True)  # nothing claimed: whole
    assert floor.after == 40 and floor.candidate is None  # no transaction id: no new candidate


def test_floor__a_full_batch_moves_it_up_to_its_highest_id_at_most() -> None:
    floor = started()
    floor.observe(xmin=500, seq=4000, xid=510, claimed=LIMIT, limit=LIMIT, top=1100, whole=True)
    floor.observe(xmin=505, seq=4050, xid=515, claimed=LIMIT, limit=LIMIT, top=1150, whole=True)  # 510 may run
    assert floor.after == 0
    floor.observe(xmin=511, seq=4100, xid=520, claimed=LIMIT, limit=LIMIT, top=1200, whole=True)
    assert floor.after == 1200  # it claimed every row it saw below its highest
    assert floor.candidate == (4000, 510)  # still good for what lies above
    floor.observe(xmin=511, seq=4200, xid=530, claimed=LIMIT, limit=LIMIT, top=4300, whole=True)
    assert floor.after == 4000 and floor.candidate == (4200, 530)


def test_floor__without_a_sequence_reading_it_never_moves() -> None:
    floor = started()  # a sequence that caches ids per backend: the horizon has no seq
    for i in range(5):
        floor.observe(xmin=500 + 10 * i, seq=None, xid=505 + 10 * i, claimed=1, limit=LIMIT, top=40 + i, whole=True)
    assert (floor.after, floor.candidate, floor.raised) == (0, None, 0)


def test_floor__never_falls_and_starts_over_for_other_shards() -> None:
    floor = started()
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    floor.observe(xmin=511, seq=30, xid=520, claimed=0, limit=LIMIT, whole=True)
    floor.observe(xmin=521, seq=35, xid=530, claimed=0, limit=LIMIT, whole=True)
    assert floor.after == 40  # a lower candidate (seq read on another path) does not lower it
    assert floor.bound([0, 1, 2], now=1.0) == 0  # a shard more: nothing is known of its rows
    assert (floor.after, floor.candidate) == (0, None)
    floor.observe(xmin=531, seq=60, xid=540, claimed=0, limit=LIMIT, whole=True)
    floor.observe(xmin=541, seq=70, xid=550, claimed=0, limit=LIMIT, whole=True)
    assert floor.after == 60
    floor.reset()  # the session lost
    assert (floor.after, floor.candidate) == (0, None)
    assert floor.bound([0, 1, 2], now=2.0) == 0


def test_floor__a_full_scan_every_period_whatever_the_floor() -> None:
    floor = started(full_scan_secs=10.0)
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    floor.observe(xmin=511, seq=50, xid=520, claimed=0, limit=LIMIT, whole=True)
    assert [floor.bound([0, 1], now=t) for t in (1.0, 9.9, 10.0, 10.1, 19.9, 20.0)] == [40, 40, 0, 40, 40, 0]


def test_floor__starts_over_on_another_session() -> None:
    floor = ClaimFloor(1000.0)
    first, second = object(), object()
    assert floor.bound([0], now=0.0, session=first) == 0
    floor.sequence = 42
    floor.observe(xmin=500, seq=40, xid=510, claimed=3, limit=LIMIT, whole=True)
    floor.observe(xmin=511, seq=50, xid=520, claimed=0, limit=LIMIT, whole=True)
    assert floor.bound([0], now=1.0, session=first) == 40
    assert floor.bound([0], now=2.0, session=second) == 0  # the same shards, a new session
    assert (floor.after, floor.candidate, floor.sequence) == (0, None, None)


def test_floor__readings_ride_along_at_most_every_reading_secs() -> None:
    floor = ClaimFloor(1000.0, reading_secs=0.1)
    assert [floor.reading_due(now=t) for t in (0.0, 0.05, 0.099, 0.1, 0.15, 0.25)] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
