"""Handshakes in batches: the database work of the sockets that arrive together.

In a connect storm (an edge killed, its peers all reconnecting) every socket's credential
check and directory row cost round trips and a worker-thread hop each, and the edge's one
core went to database drivers. Here the sockets waiting in one loop turn are gathered and
their work runs in one worker-thread hop with set-based statements: the token lookup, then
(once each socket joined its streams' groups) the cap counts, the stream heads and the
directory rows (docs/decisions/0026-handshakes-in-batches.md).

One batch of a kind runs at a time per event loop; the sockets arriving meanwhile form the
next, so a batch is as large as the load makes it (up to ``MAX_BATCH``) and a lone socket
waits for nothing. Each socket gets its own answer: a refusal of one (a bad token, a cap)
is not the others'; a database failure is the whole batch's.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from backplane import edge_db

T = TypeVar("T")
R = TypeVar("R")

# Largest number of sockets in one batch: bounds a statement's size and a batch's time in the
# worker thread (a storm's batches stay well below it: one hop takes a few milliseconds).
MAX_BATCH = 500


class Batcher(Generic[T, R]):
    """Runs ``work(items)`` on a worker thread (``edge_db.call``) for the items submitted
    while the previous batch ran (or in the same loop turn), one batch at a time.

    ``work`` returns one answer per item, in order: a value, or an exception raised to that
    item's caller. An exception ``work`` raises goes to every caller of the batch."""

    def __init__(self, work: Callable[[Sequence[T]], Sequence[R | BaseException]], max_batch: int = MAX_BATCH) -> None:
        self.work = work
        self.max_batch = max_batch
        self.pending: list[tuple[T, asyncio.Future[R]]] = []
        self.runner: asyncio.Task[None] | None = None
        self.batches = 0  # for tests and the decision record's measurements
        self.items = 0

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if self.runner is None or self.runner.done():
            # Runs from the next loop turn: every socket that reaches here in this turn joins.
            self.runner = asyncio.ensure_future(self._run())
        return await future

    async def _run(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            batch = [(item, future) for item, future in batch if not future.done()]  # cancelled: left
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            try:
                answers = await edge_db.call(self.work)([item for item, _ in batch])
            except asyncio.CancelledError:  # the loop is closing: nobody will answer these
                for _, future in batch + self.pending:
                    future.cancel()
                raise
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if future.done():
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)


class Handshakes:
    """The two batchers of one event loop: credential checks, and the opening of sockets
    (caps, stream heads, directory rows) after they joined their groups."""

    def __init__(
        self, authenticate: Callable[[Sequence[Any]], Sequence[Any]], open_: Callable[[Sequence[Any]], Sequence[Any]]
    ) -> None:
        self.authenticate: Batcher[Any, Any] = Batcher(authenticate)
        self.open: Batcher[Any, Any] = Batcher(open_)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Handshakes] = weakref.WeakKeyDictionary()


def for_loop(make: Callable[[], Handshakes]) -> Handshakes:
    """This event loop's batchers (made with ``make`` on first use)."""
    loop = asyncio.get_running_loop()
    found = _by_loop.get(loop)
    if found is None:
        found = _by_loop[loop] = make()
    return found
