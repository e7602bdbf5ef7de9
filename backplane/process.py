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
