"""A ``tyrum-v1`` peer written only from docs/protocol.md, on the stock ``websockets``
client; every read is bounded. ``Frames`` is what it shares with the in-process peer
(``harness.inprocess.AsgiPeer``), so tests read the same either way."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

PROTOCOL = "tyrum-v1"
OPERATOR_ORIGIN = "https://ops.example"
# Bounds on every wait (seconds).
FRAME_TIMEOUT = 5.0
OPEN_TIMEOUT = 10.0


def b64url(token: str) -> str:
    """A token as the ``tyrum-auth.`` subprotocol carries it (base64url, no padding)."""
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


class PeerClosed(Exception):
    """Raised by ``Frames._next_text`` when the server closed the socket; ``code`` is its close code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Frames:
    """The frames a peer received, in order, and bounded ways to wait for more."""

    def __init__(self) -> None:
        self.hello: dict[str, Any] = {}
        self.frames: list[dict[str, Any]] = []  # every frame received, in order
        self.close_code: int | None = None

    async def _next_text(self, timeout: float) -> str:
        """The next text frame; TimeoutError after ``timeout``; PeerClosed when closed."""
        raise NotImplementedError

    def head(self, name: str) -> tuple[str, int]:
        s = self.hello["streams"][name]
        return s["epoch"], s["offset"]

    async def recv(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        frame = json.loads(await self._next_text(timeout))
        self.frames.append(frame)
        return frame

    async def read_hello(self) -> dict[str, Any]:
        self.hello = await self.recv()
        assert self.hello["type"] == "hello", self.hello
        return self.hello

    @property
    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "event"]

    def stream_events(self, name: str) -> list[dict[str, Any]]:
        return [f for f in self.events if f["stream"] == name]

    async def until(self, done: Callable[[Any], bool], timeout: float = 10.0, what: str = "frames") -> None:
        """Read frames until ``done(self)`` holds; bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; got {self.frames[-5:]}")
            try:
                await self.recv(timeout=left)
            except TimeoutError:
                continue

    async def until_events(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        await self.until(lambda p: len(p.events) >= n, timeout, what=f"{n} events")
        return self.events

    async def until_resumed(self, timeout: float = 10.0) -> dict[str, Any]:
        """Read until the ``resumed`` frame; return its ``streams``."""
        await self.until(lambda p: any(f["type"] == "resumed" for f in p.frames), timeout, what="resumed")
        return self.resumed_frame()["streams"]

    def resumed_frame(self) -> dict[str, Any]:
        return next(f for f in self.frames if f["type"] == "resumed")

    async def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Read whatever arrives for ``seconds``; return those frames."""
        before = len(self.frames)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await self.recv(timeout=left)
            except TimeoutError:
                break
        return self.frames[before:]

    async def closed(self, timeout: float = FRAME_TIMEOUT) -> int:
        """Read until the server closes; return the close code it sent (1006 for none)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the server did not close within {timeout}s; got {self.frames[-5:]}")
                try:
                    await self.recv(timeout=left)
                except TimeoutError:
                    continue
        except PeerClosed as exc:
            self.close_code = exc.code
            return exc.code


class Peer(Frames):
    """A ``tyrum-v1`` peer on the stock ``websockets`` client."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__()
        self.ws = ws

    @classmethod
    async def open(
        cls,
        url: str,
        token: str | None = None,
        *,
        auth: str = "header",
        subprotocols: list[str] | None = None,
        headers: dict[str, str] | None = None,
        read_hello: bool = True,
    ) -> Peer:
        offered = list(subprotocols) if subprotocols is not None else [PROTOCOL]
        extra = dict(headers or {})
        if token is not None:
            if auth == "header":
                extra["Authorization"] = f"Bearer {token}"
            else:
                offered.append(f"tyrum-auth.{b64url(token)}")
        ws = await connect(
            url,
            subprotocols=offered,
            additional_headers=extra,  # type: ignore[arg-type]
            open_timeout=OPEN_TIMEOUT,
            max_size=2**24,
            close_timeout=2,
        )
        peer = cls(ws)
        if read_hello:
            try:
                await peer.read_hello()
            except BaseException:
                ws.transport.abort()
                raise
        return peer

    async def _next_text(self, timeout: float) -> str:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as exc:
            raise PeerClosed(exc.rcvd.code if exc.rcvd is not None else 1006) from exc
        assert isinstance(raw, str), "the server sends text frames only"
        return raw

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()


async def refused_status(url: str, **kw: Any) -> int:
    """Try to open a peer; return the HTTP status the upgrade was refused with."""
    try:
        peer = await Peer.open(url, **kw)
    except InvalidStatus as exc:
        return int(exc.response.status_code)
    await peer.close()
    raise AssertionError("the upgrade was accepted")
