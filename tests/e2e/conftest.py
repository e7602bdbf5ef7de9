"""E2E fixtures: real daphne edges and relays over the test database and Redis, and a peer
written only from PROTOCOL.md with the stock ``websockets`` client.

Processes are module-scoped where a module can share them (starting daphne costs seconds on
a small machine); tests that crash, freeze or reconfigure processes start their own. Data is
per test: each test makes its own tenants and tokens (see ``e2e_db``). Every process is
stopped by its PID in a fixture teardown, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import support
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

PROTOCOL = "tyrum-v1"
OPERATOR_ORIGIN = "https://ops.example"
# Bounds on every wait (seconds).
FRAME_TIMEOUT = 5.0
OPEN_TIMEOUT = 10.0


# --- the ORM from async tests -------------------------------------------------------------


async def orm(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a worker thread (the ORM is sync-only) and close that thread's connection.

    Closing matters: a connection left open in a pool thread would keep the test database
    from being dropped at the end of the session.
    """
    from django.db import connections

    def run() -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    return await asyncio.to_thread(run)


def make_tenant(slug: str | None = None, **kw: Any) -> Any:
    from backplane.models import Tenant

    slug = slug or f"t-{uuid.uuid4().hex[:10]}"
    return Tenant.objects.create(slug=slug, name=kw.pop("name", slug), **kw)


def make_token(tenant: Any, device: str = "dev-1", role: str = "client", expires_at: datetime | None = None) -> str:
    from backplane import auth

    return auth.create_token(tenant, device, role, expires_at=expires_at)[1]


def operator_session(tenant: Any) -> str:
    """Log a Django user in (a server-side session) as an operator of ``tenant``; return the
    ``Cookie`` header value. Edges accept it from ``OPERATOR_ORIGIN`` where they allow it."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    from backplane.models import OperatorAccess

    user = get_user_model().objects.create_user(f"op-{tenant.slug}", password="not-used-here-1")
    OperatorAccess.objects.create(user=user, tenant=tenant)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


def publish(tenant: Any, type: str, payload: Any, **kw: Any) -> str:
    """Publish one event in its own transaction, as producer code does."""
    from django.db import transaction

    from backplane import publish as bp_publish

    with transaction.atomic():
        return bp_publish(tenant, type, payload, **kw)


def publish_many(tenant: Any, events: list[dict[str, Any]]) -> list[str]:
    from django.db import transaction

    from backplane import publish_many as bp_publish_many

    with transaction.atomic():
        return bp_publish_many(tenant, events)


def stream_key(tenant: Any, name: str, *, device: str = "dev-1", role: str = "client") -> str:
    from backplane import streams

    return streams.connection_streams(tenant.id, role, device)[name]


def last_offset(key: str) -> int:
    from backplane.models import Stream

    row = Stream.objects.filter(key=key).values_list("last_offset", flat=True).first()
    return int(row or 0)


async def wait_assigned(key: str, offset: int, timeout: float = 10.0) -> None:
    """Wait until the relay has assigned ``offset`` in stream ``key`` (bounded)."""
    deadline = time.monotonic() + timeout
    while await orm(last_offset, key) < offset:
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {key} did not reach offset {offset} within {timeout}s")
        await asyncio.sleep(0.05)


async def wait_forwarded(tenant: Any, timeout: float = 10.0) -> None:
    """Wait until no event of ``tenant`` is waiting for the relay (bounded)."""
    from backplane.models import OutboxItem

    def pending() -> int:
        return OutboxItem.objects.filter(tenant=tenant, kind="event", forwarded_at__isnull=True).count()

    deadline = time.monotonic() + timeout
    while await orm(pending):
        if time.monotonic() > deadline:
            raise TimeoutError(f"events of {tenant} not forwarded within {timeout}s")
        await asyncio.sleep(0.05)


def b64url(token: str) -> str:
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


# --- the peer -----------------------------------------------------------------------------


class Peer:
    """A ``tyrum-v1`` peer on the stock ``websockets`` client; every read is bounded."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.frames: list[dict[str, Any]] = []  # every frame received, in order
        self.close_code: int | None = None

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
        ws = await connect(url, subprotocols=offered, additional_headers=extra,  # type: ignore[arg-type]
                           open_timeout=OPEN_TIMEOUT, max_size=2**24, close_timeout=2)
        peer = cls(ws)
        if read_hello:
            try:
                peer.hello = await peer.recv()
                assert peer.hello["type"] == "hello", peer.hello
            except BaseException:
                ws.transport.abort()
                raise
        return peer

    def head(self, name: str) -> tuple[str, int]:
        s = self.hello["streams"][name]
        return s["epoch"], s["offset"]

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def recv(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), "the server sends text frames only"
        frame = json.loads(raw)
        self.frames.append(frame)
        return frame

    @property
    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "event"]

    def stream_events(self, name: str) -> list[dict[str, Any]]:
        return [f for f in self.events if f["stream"] == name]

    async def until(self, done: Callable[[Peer], bool], timeout: float = 10.0, what: str = "frames") -> None:
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
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else 1006
            return self.close_code

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


@pytest.fixture
async def peers() -> Any:
    """Open peers through ``await peers(url, token, ...)``; all are closed after the test."""
    opened: list[Peer] = []

    async def make(url: str, token: str | None = None, **kw: Any) -> Peer:
        peer = await Peer.open(url, token, **kw)
        opened.append(peer)
        return peer

    yield make
    for peer in opened:
        await peer.close()


# --- clusters -----------------------------------------------------------------------------


@dataclass
class Cluster:
    """Edges (daphne) and relays started for one module or one test."""

    log_dir: Path
    env: dict[str, str]
    edges: list[support.Proc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    relays: list[support.Proc] = field(default_factory=list)
    others: list[support.Proc] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for port in self.ports]

    @property
    def edge_ids(self) -> list[str]:
        return [edge.name for edge in self.edges]

    def start_edges(self, names: list[str], ping_interval: int = 20, **env: str) -> None:
        """Start daphne edges at once, then wait for their ports (bounded)."""
        started = []
        for name in names:
            port = support.free_port()
            args = [support.PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                    "--ping-interval", str(ping_interval), "tyrum.asgi:application"]
            proc = support.Proc(name, args, {**self.env, **env, "EDGE_ID": name}, self.log_dir)
            self.edges.append(proc)
            self.ports.append(port)
            started.append((proc, port))
        for proc, port in started:
            try:
                support.wait_port(port, timeout=30)
            except TimeoutError:
                raise AssertionError(f"{proc.name} did not listen: {proc.log()[-2000:]}") from None

    def start_relay(self, name: str, *extra: str, wait: bool = True, **env: str) -> support.Proc:
        proc = support.start_relay(name, {**self.env, **env}, self.log_dir, *extra)
        self.relays.append(proc)
        if wait:
            support.wait_for(lambda: "took shards" in proc.log() or not proc.alive(), timeout=30,
                             what=f"{name} to take its shards")
            assert proc.alive(), proc.log()[-2000:]
        return proc

    def spawn(self, name: str, args: list[str], **env: str) -> support.Proc:
        """Start another child process (stopped with the cluster)."""
        proc = support.Proc(name, args, {**self.env, **env}, self.log_dir)
        self.others.append(proc)
        return proc

    @property
    def procs(self) -> list[support.Proc]:
        return [*self.others, *self.relays, *self.edges]

    def logs(self) -> dict[str, str]:
        """Every process's log by name (readable after the processes stopped, too)."""
        return {p.name: p.log_path.read_text(errors="replace") for p in self.procs}

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def register_edges(self) -> None:
        """Make sure each edge's directory row exists.

        A test that removes one (as another edge's sweep would) leaves a live edge that
        refuses new sockets until its next heartbeat re-registers it (5 s): a product bug
        shown by test_lifecycle.py::test_edge__swept_directory_row_still_accepts_new_sockets,
        kept out of the other tests by this.
        """
        from backplane.models import Edge

        for name in self.edge_ids:
            Edge.objects.get_or_create(edge_id=name)


# The database name before pytest-django renames it to the test database's.
_CONFIGURED_DB_NAME = settings.DATABASES["default"]["NAME"]


@pytest.fixture(scope="session")
def e2e_database(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Make sure the test database exists, even when only e2e tests were collected.

    pytest-django creates it only for tests that request ``db``/``transactional_db``,
    and these tests do not (see ``e2e_db``). Never let a child process near the
    configured, non-test database.
    """
    from django.test.utils import setup_databases, teardown_databases

    created = None
    if settings.DATABASES["default"]["NAME"] == _CONFIGURED_DB_NAME:
        with django_db_blocker.unblock():
            created = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    assert settings.DATABASES["default"]["NAME"] != _CONFIGURED_DB_NAME, "no test database"
    yield
    if created is not None:
        with django_db_blocker.unblock():
            teardown_databases(created, verbosity=0)


@pytest.fixture(scope="module")
def e2e_db(e2e_database: None, django_db_blocker: Any) -> Iterator[None]:
    """Committed, shared data for one module's tests, emptied when the module is done.

    Not ``transactional_db``: its flush after every test costs most of a second here, and
    the tests need no clean slate — each makes its own tenants and tokens, and every
    assertion is about its own tenant. Writes commit at once (autocommit), so the child
    processes see them. The module ends with the same flush ``transactional_db`` would run,
    so later tests find an empty database.
    """
    import redis
    from django.core.management import call_command
    from django.db import connections

    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql") or not settings.REDIS_URL:
        pytest.fail("e2e tests need DATABASE_URL=postgres://… and REDIS_URL=redis://… (run them with `make test`)")
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.ping()
    client.close()
    with django_db_blocker.unblock():
        try:
            yield
        finally:
            call_command("flush", verbosity=0, interactive=False)
            connections.close_all()


@pytest.fixture(scope="module")
def module_env(e2e_db: None) -> dict[str, str]:
    """The child processes' environment: this run's test database and Redis."""
    return support.child_env()


def _module_tag(request: pytest.FixtureRequest) -> str:
    name = Path(str(request.module.__file__)).stem.removeprefix("test_").replace("_", "-")
    return f"e2e-{name}-{os.getpid()}"


@pytest.fixture(scope="module")
def module_cluster(module_env: dict[str, str], request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two edges and one relay, shared by the tests of one module."""
    tag = _module_tag(request)
    cluster = Cluster(log_dir=tmp_path_factory.mktemp("logs"), env=module_env)
    try:
        cluster.start_edges([f"{tag}-a", f"{tag}-b"])
        cluster.start_relay(f"{tag}-relay")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(module_cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, checked alive, with its edges registered."""
    for proc in [*module_cluster.edges, *module_cluster.relays]:
        assert proc.alive(), f"{proc.name} died: {proc.log()[-3000:]}"
    module_cluster.register_edges()
    yield module_cluster


@pytest.fixture
def own_cluster(module_env: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    """An empty cluster for one test; the test starts what it needs; all stopped after it."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    cluster = Cluster(log_dir=log_dir, env=module_env)
    try:
        yield cluster
    finally:
        cluster.stop()
