"""The relay's doorbell ``Listener.wait``: a ring is never taken without being reported.

No Redis here: the ring is the listener's own event, set as its subscription task sets it.
"""

from __future__ import annotations

import asyncio
import time

from backplane.doorbell import Listener


async def test_wait__a_ring_that_comes_as_the_timeout_fires_is_reported() -> None:
    bell = Listener()
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(bell.wait(0.01))
    await asyncio.sleep(0)  # the wait is under way
    # Both timers fall due in the same loop turn, the timeout's first: the wait is cancelled,
    # then the ring comes before it resumes (a relay's loop running late does exactly this).
    loop.call_later(0.02, bell._event.set)
    time.sleep(0.05)  # noqa: ASYNC251  (block the loop: both timers overdue)
    assert await waiting is True  # was False: the ring was cleared unseen
    assert not bell.waiting()  # and taken: the next wait does not see it again


async def test_wait__a_timeout_without_a_ring_is_false_and_a_ring_before_the_wait_is_taken() -> None:
    bell = Listener()
    assert await bell.wait(0.001) is False
    bell._event.set()
    assert await bell.wait(5.0) is True  # already rung: no waiting
    assert not bell.waiting()
