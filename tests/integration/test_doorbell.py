"""The relay doorbell: a Redis PUBLISH on ``<prefix>:doorbell`` rung on commit, never on rollback."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from backplane import doorbell, exceptions, outbox, streams
from backplane.conf import conf

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SILENCE = 0.5  # how long "nothing rang" is watched for


@pytest.fixture
def bell(services: None) -> Iterator[Any]:
    """A redis-py subscription to this test's own doorbell channel (a unique prefix)."""
    prefix = f"tyrumtest-bell-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    pubsub = client.pubsub()
    with override_settings(BACKPLANE_CHANNEL_PREFIX=prefix):
        assert doorbell.channel_name() == f"{prefix}:doorbell"
        pubsub.subscribe(doorbell.channel_name())
        confirm = pubsub.get_message(timeout=5)
        assert confirm is not None and confirm["type"] == "subscribe"
        yield pubsub
    pubsub.close()
    client.close()


def rings(pubsub: Any, wait: float) -> list[bytes]:
    """Collect rings for up to ``wait`` seconds; returns as soon as one arrived."""
    deadline = time.monotonic() + wait
    got: list[bytes] = []
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=max(0.0, deadline - time.monotonic()))
        if message is not None:
            got.append(message["data"])
            break
    return got


def test_doorbell__rings_on_commit_with_the_shard(bell, tenant_factory):
    tenant = tenant_factory("acme")

    with transaction.atomic():
        outbox.publish(tenant, "run.updated", {})
        assert rings(bell, SILENCE) == []  # not before the commit

    assert rings(bell, 5) == [str(streams.shard_of(tenant.id, conf.SHARDS)).encode()]


def test_doorbell__autocommit_publish_rings(bell, tenant_factory):
    tenant = tenant_factory("acme")

    outbox.publish(tenant, "run.updated", {})

    assert len(rings(bell, 5)) == 1


def test_doorbell__rolled_back_publish_rings_nothing(bell, tenant_factory):
    tenant = tenant_factory("acme")

    with pytest.raises(RuntimeError), transaction.atomic():
        outbox.publish(tenant, "run.updated", {})
        raise RuntimeError("producer failed")

    assert rings(bell, SILENCE) == []
    # The subscription is live: a committed publish right after does ring.
    outbox.publish(tenant, "run.updated", {})
    assert len(rings(bell, 5)) == 1


def test_doorbell__failed_publish_rings_nothing(bell, tenant_factory):
    tenant = tenant_factory("acme")

    with pytest.raises(exceptions.InvalidEventType):
        outbox.publish(tenant, "Bad Type", {})

    assert rings(bell, SILENCE) == []


@pytest.fixture(autouse=True)
def fresh_wire() -> Iterator[None]:
    """Each test starts and ends with no direct connection and no pause; the test's wires are
    closed (a test that sets one of its own uses ``use_wire``, which closes the one before)."""
    use_wire(None)
    yield
    use_wire(None)


def use_wire(wire: Any) -> None:
    with doorbell._wire_lock:
        old, doorbell._wire = doorbell._wire, wire
    doorbell._wire_paused_until = 0.0
    if old is not None and old is not wire:
        old.close()


def wire_up(bell: Any, tenant: Any) -> Any:
    """Publish until the doorbell's own connection is open (the sender thread opens it after
    its first ring); return it."""
    for _ in range(50):
        outbox.publish(tenant, "run.updated", {})
        assert len(rings(bell, 5)) == 1
        if doorbell._wire is not None:
            return doorbell._wire
    raise AssertionError("the doorbell never opened its own connection")


def test_doorbell__rings_leave_from_the_committing_thread(bell, tenant_factory, monkeypatch):
    tenant = tenant_factory("acme")
    wire_up(bell, tenant)
    # From now on the sender thread is not involved: no ring is queued for it.
    queued: list[int] = []
    monkeypatch.setattr(doorbell, "_queue", SimpleNamespace(put=queued.append))

    for _ in range(3):
        outbox.publish(tenant, "run.updated", {})
        assert rings(bell, 5) == [str(streams.shard_of(tenant.id, conf.SHARDS)).encode()]

    assert queued == []
    names = [c["name"] for c in redis.Redis.from_url(settings.REDIS_URL).client_list()]
    assert f"tyrum-doorbell-{os.getpid()}" in names


def test_doorbell__connect_opens_the_direct_way_before_the_first_ring(bell, tenant_factory, monkeypatch):
    tenant = tenant_factory("acme")
    assert doorbell._wire is None
    queued: list[int] = []
    monkeypatch.setattr(doorbell, "_queue", SimpleNamespace(put=queued.append))

    doorbell.connect()
    outbox.publish(tenant, "run.updated", {})

    assert rings(bell, 5) == [str(streams.shard_of(tenant.id, conf.SHARDS)).encode()]
    assert queued == []  # the very first ring did not wait for the sender thread
    wire = doorbell._wire
    doorbell.connect()  # open already: the same connection
    assert doorbell._wire is wire


def test_doorbell__the_direct_connection_is_closed_at_exit(bell, tenant_factory):
    """The exit hook closes the committing threads' connection (no unclosed-socket warning at
    the interpreter's teardown)."""
    doorbell.connect()
    wire = doorbell._wire
    assert wire is not None

    doorbell._flush_at_exit()

    assert doorbell._wire is None
    assert wire.sock.fileno() == -1


def test_doorbell__a_connection_lost_while_idle_costs_no_ring(bell, tenant_factory):
    """A connection Redis closed while the producer was idle (its ``timeout``, a CLIENT KILL)
    is seen before the next ring is written: rings more than DRAIN_SECS apart read first."""
    tenant = tenant_factory("acme")
    wire = wire_up(bell, tenant)
    admin = redis.Redis.from_url(settings.REDIS_URL)
    name = f"tyrum-doorbell-{os.getpid()}"
    (victim,) = [c["id"] for c in admin.client_list() if c["name"] == name]
    admin.execute_command("CLIENT", "KILL", "ID", victim)
    for _ in range(100):  # until Redis has closed it (its FIN is then on our side)
        if all(c["id"] != victim for c in admin.client_list()):
            break
        time.sleep(0.01)
    else:
        raise AssertionError("Redis did not close the doorbell's connection")

    # The closed connection is noticed before the ring is written: the ring goes by the sender
    # thread, which opens a new connection.
    time.sleep(doorbell.DRAIN_SECS)
    outbox.publish(tenant, "run.updated", {})
    assert len(rings(bell, 5)) == 1
    assert doorbell._wire is not wire
    assert wire_up(bell, tenant) is not wire


def test_doorbell__a_redis_that_stops_reading_never_blocks_a_commit(bell, tenant_factory, monkeypatch):
    """A Redis that accepts the connection but never reads: once the socket's buffers are
    full, the connection is given up (no commit waits, no later ring goes on it) and rings go
    by the sender thread."""
    tenant = tenant_factory("acme")
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client = socket.create_connection(server.getsockname())
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    accepted, _ = server.accept()  # and never read from
    stuck = doorbell._Wire(client)
    use_wire(stuck)
    sent_on_stuck = 0
    try:
        for _ in range(20_000):  # ~1.3 MB of PUBLISH commands against a few KB of buffers
            if doorbell._wire is not stuck or not stuck.publish(doorbell.channel_name(), "1"):
                break
            sent_on_stuck += 1
        else:
            raise AssertionError("the never-read socket took every ring")
        assert sent_on_stuck > 0
        assert doorbell._wire is not stuck  # given up once full: no later ring goes on it

        with transaction.atomic():
            outbox.publish(tenant, "run.updated", {})
        assert len(rings(bell, 5)) == 1  # by the sender thread, to the real Redis
    finally:
        for s in (client, accepted, server):
            s.close()


def test_doorbell__an_error_reply_sends_rings_by_the_thread_for_a_while(bell, tenant_factory, monkeypatch):
    tenant = tenant_factory("acme")
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    fake = doorbell._Wire(client)
    use_wire(fake)
    try:
        assert fake.publish(doorbell.channel_name(), "1")
        accepted.sendall(b"-NOAUTH Authentication required.\r\n")
        for _ in range(100):  # until the reply has arrived
            with contextlib.suppress(BlockingIOError):
                if fake.sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the error reply did not arrive")

        time.sleep(doorbell.DRAIN_SECS)  # the next ring reads the replies first
        outbox.publish(tenant, "run.updated", {})

        assert len(rings(bell, 5)) == 1  # by the sender thread
        assert doorbell._wire is None
        assert doorbell._wire_paused_until > time.monotonic() + doorbell.RETRY_SECS / 2
        outbox.publish(tenant, "run.updated", {})
        assert len(rings(bell, 5)) == 1
        assert doorbell._wire is None  # not reopened while paused: Redis said no
    finally:
        for s in (client, accepted, server):
            s.close()


class CountingSocket:
    """A socket that counts the reads of the replies (``recv``) made through it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.reads = sock, 0

    def recv(self, size: int, *flags: int) -> bytes:
        self.reads += 1
        return self.sock.recv(size, *flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_doorbell__close_rings_skip_reading_replies_and_an_error_is_found_at_the_next_read(
    bell, tenant_factory, monkeypatch
):
    """Rings closer together than DRAIN_SECS write without reading the replies first (a
    system call saved per publish()); the first ring after DRAIN_SECS reads them, and an
    error reply among them sends rings by the sender thread as before."""
    tenant = tenant_factory("acme")
    monkeypatch.setattr(doorbell, "DRAIN_SECS", 600.0)  # the burst: however slow the machine
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    counting = CountingSocket(client)
    fake = doorbell._Wire(counting)  # type: ignore[arg-type]
    use_wire(fake)
    try:
        assert fake.publish(doorbell.channel_name(), "1")  # the first ring reads (none yet)
        assert counting.reads == 1
        accepted.sendall(b"-NOPERM this user has no permissions to access the channel\r\n")
        for _ in range(100):  # until the error reply is there to read
            with contextlib.suppress(BlockingIOError):
                if client.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the error reply did not arrive")
        for _ in range(3):
            assert fake.publish(doorbell.channel_name(), "1")  # close behind: no read, sent
        assert counting.reads == 1 and fake.unanswered == 4
        accepted.settimeout(5)
        written = b""
        while written.count(b"PUBLISH") < 4:  # all four reached the server (or recv times out)
            chunk = accepted.recv(4096)
            assert chunk, "the doorbell closed its connection"
            written += chunk

        monkeypatch.setattr(doorbell, "DRAIN_SECS", 0.0)  # as if DRAIN_SECS had passed
        outbox.publish(tenant, "run.updated", {})  # reads first: the error, so by the thread

        assert counting.reads >= 2
        assert len(rings(bell, 5)) == 1
        assert doorbell._wire is None
        assert doorbell._wire_paused_until > time.monotonic() + doorbell.RETRY_SECS / 2
    finally:
        for s in (client, accepted, server):
            s.close()


def test_doorbell__rings_left_unanswered_drop_the_connection(bell, tenant_factory, monkeypatch):
    """A connection that takes rings but never answers (a half-open TCP connection does so for
    minutes) is given up after REPLY_TIMEOUT_SECS: the next ring goes by the sender thread."""
    tenant = tenant_factory("acme")
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()  # reads nothing and answers nothing
    silent = doorbell._Wire(client)
    monkeypatch.setattr(doorbell, "REPLY_TIMEOUT_SECS", 0.2)
    use_wire(silent)
    try:
        assert silent.publish(doorbell.channel_name(), "1")  # lost: nobody answers
        assert silent.publish(doorbell.channel_name(), "1")  # still within the timeout
        time.sleep(0.3)

        outbox.publish(tenant, "run.updated", {})

        assert len(rings(bell, 5)) == 1  # by the sender thread, to the real Redis
        assert doorbell._wire is not silent
    finally:
        for s in (client, accepted, server):
            s.close()


def test_doorbell__a_forked_child_drops_the_parents_connection(bell, tenant_factory):
    """Neither the parent's connection nor a lock another thread held at the fork reaches the
    child: its first ring would deadlock, or interleave with the parent's on one socket."""
    tenant = tenant_factory("acme")
    wire_up(bell, tenant)
    with doorbell._wire_lock:  # as if another thread were ringing at the fork
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once
            os._exit(0 if doorbell._wire is None and not doorbell._wire_lock.locked() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert doorbell._wire is not None  # the parent keeps its own
    outbox.publish(tenant, "run.updated", {})
    assert len(rings(bell, 5)) == 1
