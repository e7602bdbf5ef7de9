"""The relay's doorbell ``Listener.wait``: a ring is never taken without being reported.

No Redis here: the ring is the listener's own event, set as its subscription task sets it.
Each case runs on asyncio's loop and on uvloop (the relays' default, ``backplane.process``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from backplane.doorbell import Listener

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(loop_name: str, case: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(case())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_wait__a_ring_that_comes_just_after_the_timeout_fired_is_reported(loop_name: str) -> None:
    async def case() -> None:
        bell = Listener()
        loop = asyncio.get_running_loop()
        waiting = asyncio.create_task(bell.wait(0.01))
        await asyncio.sleep(0)  # the wait is under way
        # Both timers fall due in the same loop turn, the timeout's first: the wait is
        # cancelled, then the ring comes before it resumes (a relay's loop running late).
        loop.call_later(0.03, bell._event.set)
        time.sleep(0.08)  # noqa: ASYNC251  (block the loop: both timers overdue)
        assert await waiting is True  # was False: the ring was cleared unseen
        assert not bell.waiting()  # and taken: the next wait does not see it again

    run_on(loop_name, case)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_wait__a_ring_that_comes_just_before_the_timeout_fires_is_reported(loop_name: str) -> None:
    async def case() -> None:
        bell = Listener()
        waiting = asyncio.create_task(bell.wait(0.01))
        await asyncio.sleep(0)
        time.sleep(0.05)  # noqa: ASYNC251  (the timeout overdue)
        bell._event.set()  # the ring first, in the same turn as the overdue timeout
        assert await waiting is True
        assert not bell.waiting()

    run_on(loop_name, case)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_wait__a_timeout_without_a_ring_is_false_and_a_ring_before_the_wait_is_taken(loop_name: str) -> None:
    async def case() -> None:
        bell = Listener()
        assert await bell.wait(0.001) is False
        bell._event.set()
        assert await bell.wait(5.0) is True  # already rung: no waiting
        assert not bell.waiting()

    run_on(loop_name, case)
