"""The relay's doorbell: a low-latency wake-up rung after a producer's commit.

Never a source of truth: a lost ring only delays delivery until the relay's next poll. Nor
encrypted, unlike the channel layer's messages: a ring carries shard numbers only, and a
forged one only wakes the relays for a cycle early (rings while a cycle runs fold into one
wake-up), so signing it would cost every producer's commit and protect nothing.
With ``REDIS_URL`` the ring is a Redis PUBLISH (NOTIFY inside the producer's transaction
would serialise all committers). Without Redis (embedded mode) it is in-process.

The PUBLISH goes out from the committing thread itself, on a connection of the doorbell's
own, as one non-blocking ``send`` (``_Wire``); whatever could wait — connecting, a full
socket buffer, a lost connection — goes to the background sender thread instead
(docs/decisions/0002-doorbell-redis-publish-direct-ring.md).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING

from backplane import hoptrace
from backplane.conf import conf

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

_client: redis.Redis | None = None
_client_lock = threading.Lock()
_local: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()


def channel_name() -> str:
    return f"{conf.channel_prefix}:doorbell"


def _redis() -> redis.Redis:
    global _client
    with _client_lock:
        if _client is None:
            import redis

            _client = redis.Redis.from_url(conf.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return _client


_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
_sender: threading.Thread | None = None


def ring(shard: int) -> None:
    """Wake the relays; never raises and never waits (the relay's polling covers a lost ring).

    The Redis PUBLISH is written without waiting for Redis (``_Wire``); when that cannot be
    done at once it happens on a background thread, where rings that queue up are sent as one.
    """
    if _local:  # in-process listeners (the embedded relay); a producer has none
        for loop, event in list(_local):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                _local.discard((loop, event))
    if not conf.redis_url:
        return
    wire = _wire
    if wire is not None and wire.send(_frame(shard)):
        return
    global _sender
    if _sender is None or not _sender.is_alive():
        with _client_lock:
            if _sender is None or not _sender.is_alive():
                _sender = threading.Thread(target=_send_rings, name="tyrum-doorbell", daemon=True)
                _sender.start()
    _queue.put(shard)


def connect() -> None:
    """Open the doorbell's own Redis connection now (waits up to about a second), so that even
    a process's first ring leaves from the committing thread. Optional: without it the first
    ring goes by the sender thread, which must import the client and connect first — tens of
    milliseconds during which every ring waits (docs/decisions/0029-relay-to-peer-hop.md).
    For a process about to publish a stream of events; nothing without ``REDIS_URL``."""
    if conf.redis_url and _wire is None:
        _Wire.connect()


# A ring's whole PUBLISH command by (channel, shard): built once, not per commit.
_frames: dict[tuple[str, int], bytes] = {}


def _frame(shard: int) -> bytes:
    if hoptrace.ON:  # the message carries its send time
        return _publish_frame(channel_name(), _message(str(shard)))
    key = (channel_name(), shard)
    frame = _frames.get(key)
    if frame is None:
        if len(_frames) > 4096:  # prefixes change only in tests
            _frames.clear()
        frame = _frames[key] = _publish_frame(key[0], str(shard))
    return frame


def _publish_frame(channel: str, message: str) -> bytes:
    ch, msg = channel.encode(), message.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ch), ch, len(msg), msg)


def _message(shards: str) -> str:
    """A ring's message: the shards; when tracing, ``@`` and its send time (bench/hop_trace.py).
    The listeners read no more of it than that (any message wakes them)."""
    return f"{shards}@{time.time():.6f}" if hoptrace.ON else shards


def _send_rings() -> None:
    while True:
        shards = {_queue.get()}
        _sending.set()
        while True:  # coalesce what queued up meanwhile
            try:
                shards.add(_queue.get_nowait())
            except queue.Empty:
                break
        try:
            _redis().publish(channel_name(), _message(",".join(str(s) for s in sorted(shards))))
        except Exception as exc:  # the doorbell is an optimisation, not a dependency
            logger.warning("doorbell ring failed: %s", type(exc).__name__, extra={"action": "doorbell_failed"})
            continue
        finally:
            _sending.clear()
        if _wire is None:  # Redis answers: open the committing threads' own connection
            _Wire.connect()


# A one-shot producer (publish_event, a script) exits right after its commit: its sender thread
# (a daemon) gets this long to ring first, or the event waits for the relay's poll.
RING_FLUSH_AT_EXIT_SECS = 0.5
_sending = threading.Event()


def _flush_at_exit() -> None:
    deadline = time.monotonic() + RING_FLUSH_AT_EXIT_SECS
    while (not _queue.empty() or _sending.is_set()) and _sender is not None and _sender.is_alive():
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    # The committing threads' own connection, closed rather than left to the interpreter's
    # teardown (which warns of an unclosed socket).
    global _wire
    with _wire_lock:
        wire, _wire = _wire, None
    if wire is not None:
        wire.close()


atexit.register(_flush_at_exit)


_wire: _Wire | None = None
_wire_lock = threading.Lock()
# Until then rings go by the sender thread only: Redis answered a ring with an error, or the
# direct connection cannot be made (TLS, refused AUTH) or failed; see _Wire.connect.
_wire_paused_until = 0.0
# A direct connection with rings unanswered this long is taken for dead (a half-open TCP
# connection accepts writes for many minutes): the ring goes by the thread, which reconnects.
REPLY_TIMEOUT_SECS = 1.0
# How long the direct way rests after a failure to connect or an error reply; for good when
# it cannot work (TLS, refused AUTH) — a setting fixed at start.
RETRY_SECS = 30.0
# Replies are read before a ring only when they were last read this long ago: a ring that
# follows another closely skips the read (two recv calls, ~13 µs of a publish() on the reference VM;
# docs/decisions/0049-doorbell-reads-replies-between-bursts.md). A connection closed while
# the producer was idle is still seen before its next ring.
DRAIN_SECS = 0.05


class _Wire:
    """The doorbell's own Redis connection, written to by the committing threads.

    A ring is one PUBLISH of a few dozen bytes, sent on the non-blocking socket; the replies to
    earlier rings are read (and dropped) the same way just before, when ``DRAIN_SECS`` have
    passed since they were last read (a close in a burst of rings costs the ring written into
    it; an error reply there is seen at the next read, and the rings before it are lost: the
    relay's poll covers them). Neither ever waits: when
    the socket cannot take the whole command at once, the connection is gone or rings went
    unanswered for ``REPLY_TIMEOUT_SECS``, ``publish`` returns False and the ring goes by the
    sender thread (which opens a new connection). A forked child drops the parent's connection.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.unanswered = 0
        self.waiting_since = 0.0  # when the oldest unanswered ring was sent (or replies were last read)
        self.drained_at = 0.0  # when replies were last read

    @classmethod
    def connect(cls) -> None:
        """Open the connection (the sender thread's job: it may wait, up to a second)."""
        global _wire, _wire_paused_until
        if time.monotonic() < _wire_paused_until:
            return
        try:
            sock = _open(conf.redis_url)
        except (NotImplementedError, PermissionError) as exc:  # TLS, or AUTH refused: for good
            _pause(float("inf"), "cannot use its own connection", exc)
            return
        except Exception as exc:  # rings keep going by the thread
            _pause(RETRY_SECS, "connection failed", exc)
            return
        with _wire_lock:
            old, _wire = _wire, cls(sock)
        if old is not None:
            old.close()

    def publish(self, channel: str, message: str) -> bool:
        """Send one PUBLISH now; False if it was not sent whole (nothing of it counts then)."""
        return self.send(_publish_frame(channel, message))

    def send(self, frame: bytes) -> bool:
        """Send one PUBLISH command (``_publish_frame``) now; False as ``publish``."""
        global _wire
        refused = False
        with _wire_lock:
            if _wire is not self:
                return False
            try:
                now = time.monotonic()
                if now - self.drained_at >= DRAIN_SECS:
                    self._drain(now)
                sent = self.sock.send(frame)
            except BlockingIOError:
                # Full: Redis is not reading. Given up like a lost one, or a ring that fits again
                # a moment later would sit behind the unread ones; the thread's ring reconnects.
                sent = -1
            except _Refused:
                refused, sent = True, -1
            except OSError:  # closed, reset, or unanswered too long
                sent = -1
            if sent == len(frame):
                if not self.unanswered:
                    self.waiting_since = now
                self.unanswered += 1
                return True
            _wire = None  # lost, refused, or half a command on the wire: never write to it again
        self.close()
        if refused:
            _pause(RETRY_SECS, "Redis refused a ring", None)
        return False

    def _drain(self, now: float) -> None:
        """Read what Redis replied to earlier rings; raise if one is an error, if Redis closed
        the connection (else the ring would be written into a closed connection, and lost), or
        if rings have waited for their replies too long."""
        self.drained_at = now
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                raise ConnectionResetError("Redis closed the doorbell connection")
            if b"-" in data:  # PUBLISH replies are non-negative integers (":N"); "-" is an error
                raise _Refused()
            self.unanswered = max(0, self.unanswered - data.count(b"\r\n"))
            self.waiting_since = now
            # ...and read on until nothing is left: a close behind the replies must be seen now.
        if self.unanswered and now - self.waiting_since > REPLY_TIMEOUT_SECS:
            raise TimeoutError("Redis has not answered the doorbell's rings")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Refused(Exception):
    pass


def _pause(seconds: float, what: str, exc: BaseException | None) -> None:
    global _wire_paused_until
    _wire_paused_until = time.monotonic() + seconds
    logger.warning(
        "doorbell: %s%s; rings go by the sender thread%s",
        what,
        f" ({type(exc).__name__})" if exc is not None else "",
        "" if seconds == float("inf") else f" for {seconds:.0f}s",
        extra={"action": "doorbell_failed"},
    )


def _after_fork_in_child() -> None:
    """A forked child must not write on its parent's connection, nor wait on a lock some
    other thread of the parent held at the fork."""
    global _wire, _wire_lock
    _wire_lock = threading.Lock()
    if _wire is not None:
        _wire.close()  # the child's copy of the descriptor: the parent's connection stays open
    _wire = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _open(url: str, name: str = "doorbell") -> socket.socket:
    """A connected socket to the Redis of ``url`` (TCP or Unix), authenticated and named
    ``tyrum-<name>-<pid>`` (also the relay's ``vendor.channels_redis.WirePublisher``'s). Raises
    NotImplementedError for TLS (rediss://), which ``_Wire`` does not speak, and
    PermissionError when Redis refuses the credentials."""
    from redis.connection import UnixDomainSocketConnection, parse_url

    params = parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves parse_url unannotated
    if params.get("connection_class") not in (None, UnixDomainSocketConnection):
        raise NotImplementedError("TLS")
    if "path" in params:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.create_connection((params.get("host", "localhost"), params.get("port", 6379)), timeout=1.0)
    try:
        if "path" in params:
            sock.settimeout(1.0)
            sock.connect(params["path"])
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):  # unacknowledged data: give up in 5 s
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000)
        auth = []
        if params.get("password"):
            auth = ["AUTH", *([params["username"]] if params.get("username") else []), params["password"]]
        # The name only helps operators find it in CLIENT LIST: an ACL that forbids it is fine.
        commands = [c for c in (auth, ["CLIENT", "SETNAME", f"tyrum-{name}-{os.getpid()}"]) if c]
        sock.sendall(b"".join(_command(c) for c in commands))
        replies = b""
        while replies.count(b"\r\n") < len(commands):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("Redis closed the connection")
            replies += chunk
        if auth and not replies.startswith(b"+"):
            raise PermissionError(f"Redis refused the {name}'s credentials")
    except BaseException:
        sock.close()
        raise
    return sock


def _command(args: list[str]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _sent_at(data: object) -> float:
    """A traced ring's send time (0.0 if the message has none)."""
    if isinstance(data, bytes) and b"@" in data:
        with contextlib.suppress(ValueError):
            return float(data.rsplit(b"@", 1)[1])
    return 0.0


class Listener:
    """Waits for rings. Use ``async with Listener() as bell: await bell.wait(timeout)``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._key: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        # Only noted when tracing (bench/hop_trace.py): when the last ring came in, and when its
        # producer sent it.
        self.rang_at = 0.0
        self.rung_at = 0.0

    async def __aenter__(self) -> Listener:
        self._key = (asyncio.get_running_loop(), self._event)
        _local.add(self._key)
        if conf.redis_url:
            self._task = asyncio.create_task(self._subscribe())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._key:
            _local.discard(self._key)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _subscribe(self) -> None:
        import redis.asyncio as aredis

        backoff = 0.2
        while True:
            client = aredis.Redis.from_url(conf.redis_url, socket_connect_timeout=2.0)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel_name())
                    backoff = 0.2
                    self._event.set()  # we may have missed rings while (re)subscribing
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._event.set()
                            if hoptrace.ON:
                                self.rang_at = time.time()
                                self.rung_at = _sent_at(message.get("data"))
                                hoptrace.record("bell", {"rung": self.rung_at, "rang": self.rang_at}, [])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("doorbell subscription lost: %s", type(exc).__name__, extra={"action": "doorbell_lost"})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                await client.aclose()

    def waiting(self) -> bool:
        """Whether a ring came that no ``wait`` has taken yet."""
        return self._event.is_set()

    async def wait(self, timeout: float) -> bool:
        """Wait for a ring (or ``interrupt``) or ``timeout`` seconds; return True if it rang.
        No task of its own: a ring wakes the waiter in one loop turn (not wait_for's three)."""
        rang = True
        if not self._event.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                # A ring that came as the timeout fired is taken, not cleared unseen: else its
                # rows wait for the next ring or poll.
                rang = self._event.is_set()
        self._event.clear()
        return rang

    def interrupt(self) -> None:
        """Wake the waiter now, as a ring would (a spurious wake-up only costs a cycle)."""
        self._event.set()
