"""Delivery to one peer, as a pure object: what to send, what to fill, when to close.

Contract (docs/protocol.md): a peer gets every offset of each of its streams once, in order,
from the hello's head on — or a close that tells it to resume (4001) or refetch (4409).

``Delivery`` holds a connection's per-stream cursors (the offset its peer gets next), the live
hold, the batches waiting for the slow path, the lags seen by head checks, and the inbound
token bucket. Its methods take what arrived — a relay batch, the streams' heads, a frame, a
resume — and return what to do: frames to send, ranges to fill from the outbox, a close code.
It does no I/O and never awaits; the consumer (``consumers.py``) carries its answers out.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from backplane.protocol import (
    PONG_FRAME,
    Close,
    ErrorCode,
    FrameRejected,
    Position,
    ResumeOutcome,
    error_frame,
    not_recovered,
    parse_frame,
    resume_positions,
    too_large,
)

# (stream name, epoch, [[offset, frame text], ...]): one relay batch for one stream.
Batch = tuple[str, str, list[list[Any]]]
NOTHING = range(0)


class HeadLike(Protocol):
    """A stream's head as stored: epoch, last offset, first offset still retained."""

    @property
    def epoch(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def first_retained(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Fill:
    """Read the stream's events with ``after < offset <= upto`` from the outbox, send them."""

    stream: str
    epoch: str
    after: int
    upto: int

    @property
    def count(self) -> int:
        return self.upto - self.after

    def pages(self, size: int) -> list[Fill]:
        """The range as consecutive fills of at most ``size`` events (read and sent in turn,
        so one resume holds at most one page)."""
        return [
            Fill(self.stream, self.epoch, start, min(start + size, self.upto))
            for start in range(self.after, self.upto, size)
        ]


@dataclass(frozen=True, slots=True)
class CloseWith:
    """Close the socket with this code."""

    code: Close


@dataclass(frozen=True, slots=True)
class Reply:
    """Send this frame text (a pong, an error); the connection stays open."""

    text: str


@dataclass(frozen=True, slots=True)
class Resume:
    """The peer's first frame asks to resume these streams (``Delivery.replay`` each)."""

    positions: dict[str, Position]


@dataclass(frozen=True, slots=True)
class Release:
    """End the live hold: send what was held for the peer's first frame."""


@dataclass(frozen=True, slots=True)
class Lag:
    """A stream whose head was ahead of the peer on two head checks in a row."""

    stream: str
    upto: int


# One step of the slow path: send this frame text, fill this range, or close.
Step = str | Fill | CloseWith


class Cursor:
    """Per-stream delivery state: ``next`` is the offset the peer should get next."""

    __slots__ = ("epoch", "next")

    def __init__(self, epoch: str, head: int) -> None:
        self.epoch = epoch
        self.next = head + 1

    def plan(self, offsets: Sequence[int]) -> list[tuple[int, int] | int]:
        """Return an ordered plan for ascending ``offsets``: ``int`` = send this offset,
        ``(a, b)`` = fill a..b first. Repeats are dropped. ``next`` advances as if it ran."""
        plan: list[tuple[int, int] | int] = []
        for offset in offsets:
            if offset < self.next:
                continue
            if offset > self.next:
                plan.append((self.next, offset - 1))
            plan.append(offset)
            self.next = offset + 1
        return plan


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; one per inbound frame."""

    __slots__ = ("burst", "rate", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Delivery:
    """One connection's delivery state; see the module docstring.

    ``keys`` maps the connection's stream names to stream keys; ``heads`` (by name) are the
    heads its hello announced, where its cursors start and what a resume is checked against.
    Live batches wait (``holding``) until the peer's first frame, or until the consumer's
    hold timer calls ``release()``, so a resume's replay is never overtaken by live events.
    """

    def __init__(
        self,
        keys: Mapping[str, str],
        heads: Mapping[str, HeadLike],
        *,
        max_replay: int,
        max_frame_bytes: int,
        inbound: TokenBucket,
    ) -> None:
        self.keys = dict(keys)
        self.heads = dict(heads)
        self.cursors = {name: Cursor(h.epoch, h.offset) for name, h in self.heads.items()}
        self.max_replay = max_replay
        self.max_frame_bytes = max_frame_bytes
        self.inbound = inbound
        self.holding = True
        self.first_frame_seen = False
        # Batches for the slow path, in arrival order: held ones, ones behind a gap or a
        # fill, ones that arrived while the slow path was busy.
        self.backlog: collections.deque[Batch] = collections.deque()
        self.lag_seen: dict[str, int] = {}

    # --- relay batches ----------------------------------------------------------------

    def offer(self, name: str, epoch: str, items: list[list[Any]], offsets: Sequence[int], busy: bool) -> range:
        """Take a relay batch; return the indexes of ``items`` to send now, in order.

        The fast path: a batch that continues the cursor is sent at once. Anything else —
        held for the first frame, behind the slow path (``busy``, or a backlog), a gap, a
        new epoch — goes to ``backlog`` for the slow path (``plan``), whole or from the first
        offset the fast path could not send. ``offsets`` are the items' offsets as ints."""
        if self.holding or busy or self.backlog:
            self.backlog.append((name, epoch, items))
            return NOTHING
        cursor = self.cursors[name]
        if epoch != cursor.epoch:
            self.backlog.append((name, epoch, items))
            return NOTHING
        expected = cursor.next
        n = len(offsets)
        start = 0
        while start < n and offsets[start] < expected:
            start += 1  # repeats
        stop = start
        while stop < n and offsets[stop] == expected:
            stop += 1
            expected += 1
        cursor.next = expected
        if stop < n:  # a gap (or a repeat inside the batch): the rest goes the slow way
            self.backlog.append((name, epoch, items[stop:]))
        return range(start, stop)

    def plan(self, batch: Batch) -> list[Step]:
        """The slow path for one batch: frames to send and gaps to fill first, in order;
        or a close when the stream's epoch changed (its offsets mean nothing now) or a gap
        is larger than a replay may be (the peer resumes instead). Advances the cursor as
        if the steps were carried out: a fill that cannot be must close the socket."""
        name, epoch, items = batch
        cursor = self.cursors[name]
        if epoch != cursor.epoch:
            return [CloseWith(Close.RESYNC)]
        frames = {int(offset): frame for offset, frame in items}
        steps: list[Step] = []
        for step in cursor.plan(sorted(frames)):
            if isinstance(step, tuple):
                fill = Fill(name, epoch, step[0] - 1, step[1])
                if fill.count > self.max_replay:
                    steps.append(CloseWith(Close.RECONNECT))
                    return steps
                steps.append(fill)
            else:
                steps.append(frames[step])
        return steps

    def filled(self, fill: Fill, got: int) -> CloseWith | None:
        """Check what a fill read: fewer rows than the range means they were compacted
        away, and the peer must refetch."""
        return None if got == fill.count else CloseWith(Close.RESYNC)

    # --- head checks ------------------------------------------------------------------

    def observe(self, heads: Mapping[str, HeadLike]) -> list[Lag] | CloseWith:
        """Compare the streams' heads (by stream key) with the cursors. A lag seen on two
        checks in a row is returned (``catch_up`` fills it): the relay was not just slow,
        the transport lost the tail. A head of another epoch closes 4409."""
        if self.holding:
            return []
        lags: list[Lag] = []
        for name, key in self.keys.items():
            head = heads.get(key)
            cursor = self.cursors.get(name)
            if head is None or cursor is None:
                continue
            if head.epoch != cursor.epoch:
                return CloseWith(Close.RESYNC)
            expected = cursor.next
            seen = self.lag_seen.pop(name, None)
            if seen is not None and expected <= seen:
                lags.append(Lag(name, seen))
                expected = seen + 1
            if expected <= head.offset:
                self.lag_seen[name] = head.offset
        return lags

    def catch_up(self, lag: Lag) -> Fill | CloseWith | None:
        """The fill a lag still needs, with the slow path's lock held (it may have sent the
        lagging offsets meanwhile: then nothing). Moves the cursor past it."""
        cursor = self.cursors[lag.stream]
        if cursor.next > lag.upto:
            return None
        fill = Fill(lag.stream, cursor.epoch, cursor.next - 1, lag.upto)
        cursor.next = lag.upto + 1
        return CloseWith(Close.RECONNECT) if fill.count > self.max_replay else fill

    # --- inbound frames ---------------------------------------------------------------

    def frame(self, text: str | None, now: float) -> list[Reply | Resume | Release | CloseWith]:
        """Take one inbound frame (``None``: a binary one); return what to do, in order."""
        if text is None:
            return [CloseWith(Close.MALFORMED_FRAME)]
        if too_large(text, self.max_frame_bytes):
            return [CloseWith(Close.FRAME_TOO_LARGE)]
        if not self.inbound.take(now):
            return [CloseWith(Close.RATE_LIMITED)]
        try:
            message = parse_frame(text)
        except FrameRejected as exc:
            return [CloseWith(exc.code)]
        first = not self.first_frame_seen
        self.first_frame_seen = True
        kind = message["type"]
        if kind == "resume":
            if not first:
                return [Reply(error_frame(ErrorCode.RESUME_NOT_FIRST))]
            positions = resume_positions(message)
            if positions is None:
                return [Reply(error_frame(ErrorCode.INVALID_RESUME)), Release()]
            return [Resume(positions)]
        out: list[Reply | Resume | Release | CloseWith] = [Release()] if first else []
        out.append(Reply(PONG_FRAME if kind == "ping" else error_frame(ErrorCode.UNKNOWN_TYPE)))
        return out

    def release(self) -> bool:
        """End the live hold; True if it was on (the held batches are in ``backlog``)."""
        was, self.holding = self.holding, False
        return was

    # --- resume -----------------------------------------------------------------------

    def replay(self, name: str, position: Position) -> Fill | dict[str, Any]:
        """The replay a resume of ``name`` from ``position`` needs, or its refusal (the
        ``resumed`` entry). Checked against the hello's heads: the live hold covers what
        came after them."""
        head = self.heads.get(name)
        if head is None:
            return not_recovered(ResumeOutcome.UNKNOWN_STREAM)
        if position.epoch != head.epoch:
            return not_recovered(ResumeOutcome.EPOCH_CHANGED)
        if position.offset > head.offset:
            return not_recovered(ResumeOutcome.OFFSET_AHEAD)
        missing = head.offset - position.offset
        if position.offset + 1 < head.first_retained or missing > self.max_replay:
            return not_recovered(ResumeOutcome.RETENTION_EXCEEDED)
        return Fill(name, head.epoch, position.offset, head.offset)

    def replayed_page(self, page: Fill, got: int, first: bool) -> dict[str, Any] | CloseWith | None:
        """Check one page of a paged replay: None when it is whole (send it, go on). Short on
        the first page, nothing was sent: the stream is refused (``retention_exceeded``).
        Short on a later page (compacted meanwhile), part was sent: close 4409, so the peer
        refetches instead of taking a partial replay for a recovered one."""
        if got == page.count:
            return None
        return not_recovered(ResumeOutcome.RETENTION_EXCEEDED) if first else CloseWith(Close.RESYNC)
