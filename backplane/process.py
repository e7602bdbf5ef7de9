"""Process-wide tuning of the backplane's long-running processes (edges, relays, ``serve``)."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# ``uvloop`` (the default when it is installed) or ``asyncio``: the event loop under relays and
# edges (docs/decisions/0031-speed-libraries.md). Read from the environment, not from Django's
# settings: an edge must choose before daphne makes twisted's loop, before settings load.
EVENT_LOOP_VARIABLE = "BACKPLANE_EVENT_LOOP"
EVENT_LOOPS = ("uvloop", "asyncio")


def freeze_startup_objects() -> None:
    """Collect garbage once, then take every object alive now — modules, settings, code:
    hundreds of thousands after Django has started — out of the cyclic collector's view.

    A full collection then walks only what the process made since, so it does not stall
    forwarding (docs/decisions/0016-gc-freeze-at-start-up.md).
    """
    gc.collect()
    gc.freeze()


# A full collection on an edge waits for this many collections of the middle generation
# (CPython: 10), and, as in CPython, until the objects new since the last one are a quarter of
# those it walks. A socket's objects live as long as the socket: with CPython's 10, a connect
# storm of 10 000 peers walked all the open sockets' objects again at every 25 % of growth —
# 14 full collections, ~5 s of the edge's one core (the storm 16 s), finding nothing to free;
# with 100, two. What may wait for one is 100 × 10 × 700 net new objects, ~4 500 sockets'
# worth (the quarter rule alone: ~2 500 on an edge of 10 000 peers, 5 000 of 20 000)
# (docs/decisions/0032-full-collections-in-a-connect-storm.md).
FULL_COLLECTION_EVERY = 100


def defer_full_collections() -> None:
    """Let an edge's full collections wait for FULL_COLLECTION_EVERY collections of the middle
    generation, not CPython's 10 (the young generations keep theirs)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


# An edge freezes (``gc.freeze``) once this many connections opened since its last freeze: a
# full collection walks only what is not frozen, and at 20 000 open sockets one that walked
# them all held the edge 1.4–2.4 s (0.2–1.1 s each of four in the storm that opened them).
FREEZE_AFTER_OPENED = 1000
# ... and thaws (``gc.unfreeze``) once a quarter of what it froze has closed: a closed socket
# leaves cyclic garbage (~23 objects; 459 448 from 20 000 at a teardown) that a frozen
# generation never frees, so this bounds it; the next full collection walks everything once.
THAW_AFTER_CLOSED_SHARE = 0.25


class Freezer:
    """Keeps an edge's long-lived connections out of the cyclic collector's full walks
    (docs/decisions/0040): daphne's server counts connections opened and closed, and its
    once-a-second reaper calls ``tick``, which freezes every object alive once
    FREEZE_AFTER_OPENED connections opened since the last freeze (after collecting the young
    generations: their garbage is not frozen), and thaws once the connections closed since
    the first freeze are THAW_AFTER_CLOSED_SHARE of those frozen (at least
    FREEZE_AFTER_OPENED); after a thaw it freezes again only once a full collection (at
    CPython's pace) has freed what the closed ones left."""

    def __init__(self) -> None:
        self.open = 0  # connections open now
        self.opened = 0  # since the last freeze (or thaw)
        self.frozen = 0  # open at the last freeze: what a thaw waits for a share of
        self.closed = 0  # since the first freeze after a thaw
        self.freezes = self.thaws = 0
        self.thawed_at: int | None = None  # full collections so far when it last thawed

    def connected(self) -> None:
        self.open += 1
        self.opened += 1

    def disconnected(self) -> None:
        self.open = max(0, self.open - 1)  # never below 0, whatever a hook reports
        if self.frozen:
            self.closed += 1

    def tick(self) -> None:
        if self.frozen and self.closed >= max(FREEZE_AFTER_OPENED, THAW_AFTER_CLOSED_SHARE * self.frozen):
            gc.unfreeze()  # the start-up objects too (0016): the next freeze takes them again
            self.frozen = self.closed = 0
            self.opened = self.open  # all of them may be frozen again
            self.thaws += 1
            self.thawed_at = gc.get_stats()[2]["collections"]
            return
        if self.thawed_at is not None:  # frozen again before a full collection: garbage kept
            if gc.get_stats()[2]["collections"] <= self.thawed_at:
                return
            self.thawed_at = None
        if self.opened >= FREEZE_AFTER_OPENED:
            gc.collect(1)
            gc.freeze()
            self.frozen, self.opened = self.open, 0
            self.freezes += 1


# The edge's (``freeze_connections``); None in other processes.
freezer: Freezer | None = None


def freeze_connections() -> Freezer:
    """Make this process an edge whose long-lived connections are frozen (``Freezer``)."""
    global freezer
    if freezer is None:
        freezer = Freezer()
    return freezer


def event_loop() -> str:
    """The event loop this process runs on: ``BACKPLANE_EVENT_LOOP`` (default ``uvloop``),
    ``asyncio`` when uvloop is not installed."""
    wanted = os.environ.get(EVENT_LOOP_VARIABLE, "").strip().lower() or "uvloop"
    if wanted not in EVENT_LOOPS:
        raise ValueError(f"{EVENT_LOOP_VARIABLE} must be one of {', '.join(EVENT_LOOPS)}, not {wanted!r}")
    if wanted == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
    return wanted


def install_event_loop_policy() -> str:
    """Make the loops this process creates from now on ``event_loop()``'s; return its name."""
    chosen = event_loop()
    if chosen == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return chosen


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on ``event_loop()``'s loop."""
    if event_loop() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
