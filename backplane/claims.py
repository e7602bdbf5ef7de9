"""The relay's claim floor: the id at or below which every row of its shards has its offset.

An assigned row's entry stays in the claim's partial index (``stream_offset IS NULL``) until a
VACUUM removes it, and a claim that starts from the lowest id walks past all of them: its cost
grows with the rows assigned since the last vacuum (docs/decisions/0048). A floor lets the
claim's index scan start above it. It must never pass a row that can still be claimed, or that
row would wait for the next full scan; how it moves, with PostgreSQL's transaction ids:

- Each assignment reads, before it claims, the oldest transaction still running (``xmin``)
  and the last outbox id handed out (``seq``); after the claim, its own transaction id
  (``xid``), given at its first row lock, so after ``seq`` was read.
- A row with an id at or below ``seq`` was inserted by a transaction that took its id before
  ``seq`` was read. The publish statements insert the event key before the outbox row, and
  directed commands ask for their transaction id first, so that transaction had its id
  before ``xid`` was given: it is older than ``xid``.
- So ``(seq, xid)`` is a candidate. A later assignment whose ``xmin`` is past ``xid`` sees
  every such transaction ended (committed or rolled back); if it claimed fewer rows than its
  limit, with no tenant left out, it claimed every row of the shards above the floor that its
  snapshot showed, and after its commit none at or below ``seq`` is left: the floor moves to
  ``seq``.

A full batch moves the floor too, up to its highest id at most: it claimed every row it saw
below that one. The outbox's id sequence must hand ids out one at a time (``CACHE 1``, as
Django creates it): with a cache a backend takes ids from a range reserved earlier, below the
last value read, so the horizon reports no ``seq`` then and the floor stays where it is. (After
a cache is lowered back to 1, backends that hold cached ids still hand them out: reconnect the
producers first.)

A long transaction holds the floor back (its rows could still commit), as it should. Anything
that breaks the ordering above (a row inserted by other code whose transaction id comes after
its outbox id) is found by a full scan every ``FULL_SCAN_SECS``: late, never lost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

# A claim from the lowest id this often whatever the floor: the safety net for a row inserted
# in a way the floor's reasoning does not cover. It walks the assigned rows' index entries
# once, instead of every cycle.
FULL_SCAN_SECS = 10.0

# The readings (two statements around the call) go with an assignment at most this often: with
# every call they cost the assignment ~0.05-0.1 ms at 500 ev/s (docs/decisions/0048), and the
# floor needs no more than a few moves a second (the entries it skips pile up at the rate of
# the events).
READING_SECS = 0.1


class ClaimFloor:
    """One relay's floor over the shards it leases (reset when they change)."""

    def __init__(self, full_scan_secs: float = FULL_SCAN_SECS, reading_secs: float = READING_SECS) -> None:
        self.full_scan_secs = full_scan_secs
        self.reading_secs = reading_secs
        self.reading_at = 0.0  # monotonic time of the next assignment that takes the readings
        self.shards: tuple[int, ...] = ()
        self.after = 0  # every row of the shards with an id at or below this has its offset
        self.candidate: tuple[int, int] | None = None  # (seq, xid) of an earlier assignment
        self.full_scan_at = 0.0  # monotonic time of the next claim from the lowest id
        self.raised = 0  # times the floor moved (tests, metrics)
        self.sequence: int | None = None  # the outbox id sequence's oid, once looked up
        self.session: object = None  # the session the floor was learnt on

    def bound(self, shards: Sequence[int], now: float | None = None, session: object = None) -> int:
        """The id to claim above for the next assignment over ``shards`` on ``session`` (the
        relay's lease session), 0: from the lowest."""
        if session is not self.session:  # a new session may meet a database that failed over
            self.reset()
            self.session = session
        owned = tuple(sorted(shards))
        if owned != self.shards:  # other shards: nothing known about their rows
            self.shards, self.after, self.candidate = owned, 0, None
        now = time.monotonic() if now is None else now
        if now >= self.full_scan_at:
            self.full_scan_at = now + self.full_scan_secs
            return 0
        return self.after

    def reading_due(self, now: float | None = None) -> bool:
        """Whether the next assignment takes the floor's readings (then ``observe`` follows it)."""
        now = time.monotonic() if now is None else now
        if now < self.reading_at:
            return False
        self.reading_at = now + self.reading_secs
        return True

    def observe(
        self,
        xmin: int | None,
        seq: int | None,
        xid: int | None,
        claimed: int,
        limit: int,
        top: int | None = None,
        *,
        whole: bool,
    ) -> None:
        """After an assignment that committed: ``xmin`` and ``seq`` read before its claim
        (``seq`` None: the floor cannot rely on it), its ``xid`` (None when it claimed
        nothing), the rows it ``claimed`` of ``limit`` and the highest id among them (``top``);
        ``whole``: no tenant was left out of it (no quarantine, not a one-tenant retry)."""
        if not whole or xmin is None:
            return
        candidate = self.candidate
        if candidate is not None and xmin > candidate[1]:
            if claimed < limit:  # it claimed everything it saw above the floor
                reach = candidate[0]
            else:  # a full batch: everything it saw up to its highest id (a backlog, where it matters most)
                reach = min(candidate[0], top if top is not None else self.after)
            if reach > self.after:
                self.after = reach
                self.raised += 1
            if reach >= candidate[0]:
                self.candidate = candidate = None
        if candidate is None and xid is not None and seq is not None:
            self.candidate = (seq, xid)

    def reset(self) -> None:
        """Nothing known any more (the relay's session was lost: a new one may find a database
        that failed over and handed out ids again)."""
        self.shards, self.after, self.candidate, self.sequence = (), 0, None, None
