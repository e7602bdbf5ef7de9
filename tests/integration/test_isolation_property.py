"""Tenant isolation as a property (issue 13, point 8).

A stateful Hypothesis test drives tenants, devices, roles, tokens and peer actions — connect,
resume with arbitrary stream names, epochs and offsets, reconnect to the other edge, disconnect,
revoke — against the real consumer, two ``EdgeRuntime``s standing for two edges, the relay
driven in process and the store on the test database (channels' ``WebsocketCommunicator``, the
in-memory channel layer). After every step it checks everything each peer saw:

- ``hello``: exactly the peer's three streams, each at its own epoch (the database's) and head;
- events: of the peer's own tenant and audience, in the stream and at the offset they were
  published to, with its stream's epoch;
- ``resumed``: exactly what the peer's own heads give (``unknown_stream`` for a name that is
  not one of its three, whatever else it names);
- no frame names another tenant's id or the epoch of any stream that is not the peer's;
- after a revocation the peer's sockets close with 4008 and get nothing more;

and that every open peer gets every event of its streams (so the checks cannot pass by
delivering nothing).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connections, transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from backplane import directory, events, limits, outbox, streams, tokens
from backplane.consumers import GatewayConsumer
from backplane.edge import EdgeRuntime
from backplane.models import Stream, Tenant
from backplane.protocol import STREAM_NAMES
from backplane.relay import Relay

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# Bounded: a few tens of seconds for the whole property on the project's 2-core machine.
MAX_EXAMPLES = 20
STEPS = 25
TENANTS = 2
DEVICES = ("dev-1", "dev-2")  # the same device ids and roles in every tenant
ROLES = ("client", "node")
PORTS = {8101: "iso-edge-a", 8102: "iso-edge-b"}  # the scope's server port picks the edge
WORKERS = 4  # the loop's worker threads (each holds a database connection)
STEP_SECS = 10.0  # bound on any one step's asynchronous work
DELIVERY_SECS = 3.0  # bound on waiting for what a step should deliver
STRAY_SECS = 0.02  # after delivery: what else would arrive now, would have

RUNTIMES: dict[int, EdgeRuntime] = {}  # the running example's edges, by port

AUDIENCES = [{}, *({"role": r} for r in ROLES), *({"device": d} for d in DEVICES)]
# A peer's first frame: a ping (None), or a resume of (name, epoch, offset) choices that
# ``Isolation.resolve`` turns into the peer's own, another tenant's or made-up values.
NAMES = st.sampled_from([*STREAM_NAMES, "edge", ("key", "tenant"), ("key", "role"), ("key", "device"), ("id",)])
EPOCHS = st.sampled_from(["own", "foreign"]) | st.text(alphabet="0123456789abcdef", min_size=8, max_size=8)
OFFSETS = st.sampled_from(["own", "own+1", "foreign", 0]) | st.integers(0, 40)
FIRST_FRAMES = st.none() | st.lists(
    st.tuples(NAMES | st.text(max_size=8), EPOCHS, OFFSETS), max_size=4, unique_by=lambda c: c[0]
)


def keys_of(tenant_id: uuid.UUID, role: str, device: str) -> dict[str, str]:
    """A connection's stream keys, by name (not from ``streams.connection_streams``: it is
    one of the things under test)."""
    return {
        "tenant": streams.tenant_stream(tenant_id),
        "role": streams.role_stream(tenant_id, role),
        "device": streams.device_stream(tenant_id, device),
    }


@dataclass(eq=False)
class Token:
    tenant: Tenant
    device: str
    role: str
    token: str
    row_id: uuid.UUID
    revoked: bool = False

    def keys(self) -> dict[str, str]:
        return keys_of(self.tenant.id, self.role, self.device)


@dataclass(eq=False)
class Peer:
    token: Token
    port: int
    comm: WebsocketCommunicator
    keys: dict[str, str]
    hello: dict[str, dict[str, Any]] = field(default_factory=dict)
    start: dict[str, int] = field(default_factory=dict)  # live (or replayed) from after this offset
    last: dict[str, int] = field(default_factory=dict)  # highest offset received per stream
    got: set[str] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    resumed: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    left: bool = False  # the peer disconnected itself

    @property
    def open(self) -> bool:
        return self.close_code is None and not self.left


def app_on(port: int) -> Any:
    """The consumer, as daphne would run it on an edge listening on ``port``."""
    consumer = GatewayConsumer.as_asgi()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await consumer({**scope, "server": ("127.0.0.1", port)}, receive, send)

    return app


async def runtime_for(cls: type[EdgeRuntime], port: int | None = None) -> EdgeRuntime:
    return RUNTIMES[port]  # type: ignore[index]


class Isolation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Each example starts with no failed authentications on record: the throttle is the
        # process's, and revoked tokens tried in earlier examples would otherwise refuse valid
        # ones here, the more so the faster the examples run.
        limits.throttle().buckets.clear()
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(max_workers=WORKERS)
        self.loop.set_default_executor(self.executor)
        self.tenants = [
            Tenant.objects.create(name=f"iso {n}", slug=f"iso-{uuid.uuid4().hex[:12]}") for n in range(TENANTS)
        ]
        self.tokens: list[Token] = []
        for tenant in self.tenants:  # a token for each device and role of every tenant to start with
            for device in DEVICES:
                for role in ROLES:
                    self.make_token_for(tenant, device, role)
        self.peers: list[Peer] = []
        self.published: dict[str, list[str]] = {}  # stream key -> event ids, in offset order
        self.epochs: dict[str, str] = {}  # stream key -> epoch, from the database
        self.run(self._start())

    # --- plumbing ---------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, STEP_SECS))

    async def _start(self) -> None:
        self.layer = InMemoryChannelLayer(capacity=100_000)
        before = signal.getsignal(signal.SIGTERM)
        try:
            for port, edge_id in PORTS.items():
                RUNTIMES[port] = EdgeRuntime(edge_id, layer=self.layer)
                await RUNTIMES[port].start()
        finally:
            signal.signal(signal.SIGTERM, before)  # start() installs the edge's own handler
        self.relay = Relay(self.layer)

    def teardown(self) -> None:
        try:
            self.run(self._stop())
        finally:
            barrier = threading.Barrier(WORKERS)

            def close_connections() -> None:  # one call per worker thread: each holds one
                barrier.wait(STEP_SECS)
                connections.close_all()

            for done in [self.executor.submit(close_connections) for _ in range(WORKERS)]:
                done.result(STEP_SECS)
            self.executor.shutdown()
            self.loop.close()
            RUNTIMES.clear()

    async def _stop(self) -> None:
        for peer in self.peers:
            if not peer.left:
                await peer.comm.disconnect(timeout=STEP_SECS)
        for runtime in RUNTIMES.values():
            for task in runtime.tasks:
                task.cancel()
            await asyncio.gather(*runtime.tasks, return_exceptions=True)
            await database_sync_to_async(directory.unregister_edge)(runtime.edge_id)
        await self.relay.aclose()

    async def _settle(self) -> None:
        """Forward what was published, then wait until every open peer has every event of its
        streams and every revoked peer its close (bounded), and a little more for strays."""
        for _ in range(4):
            assigned, forwarded = await self.relay.cycle()
            if not assigned and not forwarded:
                break
        await self.relay.flush_marks()
        deadline = self.loop.time() + DELIVERY_SECS
        while True:
            self._pump()
            missing = self._missing()
            if not missing:
                break
            assert self.loop.time() < deadline, f"not delivered within {DELIVERY_SECS}s: {missing}"
            await asyncio.sleep(0.005)
        await asyncio.sleep(STRAY_SECS)
        self._pump()
        self.epochs = await database_sync_to_async(lambda: dict(Stream.objects.values_list("key", "epoch")))()

    def settle(self) -> None:
        self.run(self._settle())

    def _missing(self) -> dict[str, Any]:
        missing: dict[str, Any] = {}
        for n, peer in enumerate(self.peers):
            if peer.left or peer.close_code is not None:
                continue
            if peer.token.revoked:
                missing[f"peer {n}"] = "no close after its token was revoked"
                continue
            for name, key in peer.keys.items():
                wanted = set(self.published.get(key, [])[peer.start[name] :]) - peer.got
                if wanted:
                    missing[f"peer {n} {name}"] = sorted(wanted)
        return missing

    def _pump(self) -> None:
        """Take every frame the peers' sockets have sent so far, checking each."""
        for peer in self.peers:
            queue = peer.comm.output_queue
            while not queue.empty():
                self._take(peer, queue.get_nowait())

    def _take(self, peer: Peer, message: dict[str, Any]) -> None:
        assert peer.close_code is None, f"{message['type']} after the close {peer.close_code}"
        if message["type"] == "websocket.close":
            peer.close_code = message.get("code", 1000)
            assert peer.close_code == 4008 and peer.token.revoked, f"closed with {peer.close_code}"
            return
        assert message["type"] == "websocket.send", message["type"]
        frame = json.loads(message["text"])
        kind = frame["type"]
        # A resumed answer names the streams the peer asked about: those it may echo.
        text = json.dumps(list(frame["streams"].values())) if kind == "resumed" else message["text"]
        peer.texts.append(text)
        self._check_text(peer, text)
        if kind == "event":
            name, event_id = frame["stream"], frame["event"]["event_id"]
            assert name in peer.keys, frame
            key = peer.keys[name]
            assert event_id in self.published.get(key, []), f"event {event_id} is not of {name} of this peer"
            assert frame["offset"] == self.published[key].index(event_id) + 1
            assert frame["epoch"] == peer.hello[name]["epoch"]
            assert frame["event"]["payload"]["tag"] == peer.token.tenant.slug
            peer.got.add(event_id)
            peer.last[name] = max(peer.last.get(name, 0), frame["offset"])
        elif kind == "resumed":
            peer.resumed.append(frame)
        else:
            assert kind in ("hello", "pong"), frame

    def _check_text(self, peer: Peer, text: str) -> None:
        own = set(peer.keys.values())
        for tenant in self.tenants:
            if tenant.id != peer.token.tenant.id:
                assert tenant.id.hex not in text and str(tenant.id) not in text
        own_epochs = {self.epochs.get(k) for k in own}
        for key, epoch in self.epochs.items():
            if key not in own and epoch not in own_epochs:
                assert f'"epoch":"{epoch}"' not in text, f"another stream's epoch ({key}) in {text}"

    # --- actions --------------------------------------------------------------------------

    async def _connect(self, token: Token, port: int) -> Peer | None:
        comm = WebsocketCommunicator(
            app_on(port),
            "/ws",
            headers=[(b"authorization", f"Bearer {token.token}".encode())],
            subprotocols=["tyrum-v1"],
        )
        accepted, _ = await comm.connect(timeout=STEP_SECS)
        if not accepted:
            await comm.disconnect(timeout=STEP_SECS)
            return None
        peer = Peer(token, port, comm, token.keys())
        hello_text = await comm.receive_from(timeout=STEP_SECS)
        peer.texts.append(hello_text)
        hello = json.loads(hello_text)
        assert hello["type"] == "hello" and hello["edge_id"] == PORTS[port]
        peer.hello = hello["streams"]
        peer.start = {name: position["offset"] for name, position in peer.hello.items()}
        self.peers.append(peer)
        return peer

    def connect_peer(self, token: Token, port: int) -> Peer | None:
        peer = self.run(self._connect(token, port))
        if token.revoked:
            assert peer is None, "a revoked token was accepted"
            return None
        assert peer is not None, "a valid token was refused"
        epochs = dict(Stream.objects.filter(key__in=list(peer.keys.values())).values_list("key", "epoch"))
        assert peer.hello == {
            name: {"epoch": epochs.get(key), "offset": len(self.published.get(key, []))}
            for name, key in peer.keys.items()
        }, "hello is not the peer's own streams at their heads"
        self._check_text(peer, peer.texts[0])
        return peer

    async def _first_frame(self, peer: Peer, frame: dict[str, Any]) -> None:
        await peer.comm.send_json_to(frame)
        if frame["type"] != "resume":
            return
        deadline = self.loop.time() + DELIVERY_SECS
        while not peer.resumed:
            assert self.loop.time() < deadline, "no resumed answer"
            self._pump()
            await asyncio.sleep(0.002)

    def first_frame(self, peer: Peer, frame: dict[str, Any]) -> None:
        self.run(self._first_frame(peer, frame))
        if frame["type"] != "resume":
            return
        expected = {}
        for name, position in frame["streams"].items():
            head = peer.hello.get(name) if name in STREAM_NAMES else None
            if head is None:
                expected[name] = {"recovered": False, "reason": "unknown_stream"}
            elif position["epoch"] != head["epoch"]:
                expected[name] = {"recovered": False, "reason": "epoch_changed"}
            elif position["offset"] > head["offset"]:
                expected[name] = {"recovered": False, "reason": "offset_ahead"}
            else:
                expected[name] = {"recovered": True, "replayed": head["offset"] - position["offset"]}
                peer.start[name] = position["offset"]
        assert peer.resumed == [{"type": "resumed", "streams": expected}]
        for name, start in peer.start.items():  # the replay came before the answer
            replayed = set(self.published.get(peer.keys[name], [])[start : peer.hello[name]["offset"]])
            assert replayed <= peer.got, (name, replayed - peer.got)

    def resolve(self, peer: Peer, choices: list[tuple[Any, Any, Any]]) -> dict[str, dict[str, Any]]:
        """Resume positions from abstract choices (drawn without looking at this example's
        state, which holds random epochs): own, other tenants' and made-up names, epochs and
        offsets."""
        other = next(t for t in self.tenants if t.id != peer.token.tenant.id)
        foreign = keys_of(other.id, peer.token.role, peer.token.device)
        out: dict[str, dict[str, Any]] = {}
        for name_choice, epoch_choice, offset_choice in choices:
            if isinstance(name_choice, tuple):  # another tenant's stream key, or its id
                name = foreign[name_choice[1]] if name_choice[0] == "key" else other.id.hex
            else:
                name = name_choice
            own_name = name if name in peer.hello else "tenant"
            foreign_key = foreign[own_name]
            epoch = {
                "own": peer.hello[own_name]["epoch"],
                "foreign": self.epochs.get(foreign_key, "00000000"),
            }.get(epoch_choice, epoch_choice)
            heads = {
                "own": peer.hello[own_name]["offset"],
                "own+1": peer.hello[own_name]["offset"] + 1,
                "foreign": len(self.published.get(foreign_key, [])),
            }
            out[name] = {"epoch": epoch, "offset": heads.get(offset_choice, offset_choice)}
        return out

    # --- rules ----------------------------------------------------------------------------

    def make_token_for(self, tenant: Tenant, device: str, role: str) -> None:
        row, token = tokens.create_token(tenant, device, role)
        self.tokens.append(Token(tenant, device, role, token, row.id))

    @rule(tenant=st.integers(0, TENANTS - 1), device=st.sampled_from(DEVICES), role=st.sampled_from(ROLES))
    def make_token(self, tenant: int, device: str, role: str) -> None:
        """Another token for a device (revoking one leaves the other's sockets open)."""
        self.make_token_for(self.tenants[tenant], device, role)

    def publish_to(self, owner: Tenant, audience: dict[str, str]) -> None:
        with transaction.atomic():
            event_id = outbox.publish(owner, "iso.updated", {"tag": owner.slug}, **audience)
        key = events.stream_for(owner.id, audience.get("device"), audience.get("role"))
        self.published.setdefault(key, []).append(event_id)

    @initialize()
    def history(self) -> None:
        """An event in every stream of every tenant, so hellos and resumes have offsets to give."""
        for owner in self.tenants:
            for audience in AUDIENCES:
                self.publish_to(owner, audience)
        self.settle()

    @rule(tenant=st.integers(0, TENANTS - 1), audience=st.sampled_from(AUDIENCES))
    def publish(self, tenant: int, audience: dict[str, str]) -> None:
        self.publish_to(self.tenants[tenant], audience)
        self.settle()

    @initialize(data=st.data(), port=st.sampled_from(sorted(PORTS)), first=FIRST_FRAMES)
    def connect_a_peer_of_each_tenant(self, data: st.DataObject, port: int, first: Any) -> None:
        for tenant in self.tenants:
            self.connect_with(data.draw(st.sampled_from([t for t in self.tokens if t.tenant is tenant])), port, first)

    @rule(data=st.data(), port=st.sampled_from(sorted(PORTS)), first=FIRST_FRAMES)
    def connect(self, data: st.DataObject, port: int, first: Any) -> None:
        self.connect_with(data.draw(st.sampled_from(self.tokens)), port, first)

    def connect_with(self, token: Token, port: int, first: Any) -> None:
        peer = self.connect_peer(token, port)
        if peer is not None:
            frame = {"type": "ping"} if first is None else {"type": "resume", "streams": self.resolve(peer, first)}
            self.first_frame(peer, frame)
        self.settle()

    @precondition(lambda self: any(p.open and not p.token.revoked for p in self.peers))
    @rule(data=st.data())
    def reconnect_to_the_other_edge(self, data: st.DataObject) -> None:
        """The peer leaves and resumes, on the other edge, from what it got."""
        old = data.draw(st.sampled_from([p for p in self.peers if p.open and not p.token.revoked]))
        self.run(old.comm.disconnect(timeout=STEP_SECS))
        old.left = True
        for owner in self.tenants:  # while it is away: for it, and for its namesake elsewhere
            self.publish_to(owner, {"device": old.token.device})
        self.settle()
        peer = self.connect_peer(old.token, next(port for port in PORTS if port != old.port))
        assert peer is not None
        positions = {
            name: {"epoch": old.hello[name]["epoch"], "offset": old.last.get(name, old.start[name])}
            for name in STREAM_NAMES
        }
        self.first_frame(peer, {"type": "resume", "streams": positions})
        assert all(entry["recovered"] for entry in peer.resumed[0]["streams"].values())
        self.settle()

    @precondition(lambda self: any(p.open for p in self.peers))
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from([p for p in self.peers if p.open]))
        self.run(peer.comm.disconnect(timeout=STEP_SECS))
        peer.left = True

    @precondition(lambda self: any(not t.revoked for t in self.tokens))
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from([t for t in self.tokens if not t.revoked]))
        tokens.revoke_token(str(token.row_id))
        token.revoked = True
        self.settle()
        for peer in self.peers:
            if peer.token is token and not peer.left:
                assert peer.close_code == 4008, peer.close_code

    @invariant()
    def nothing_of_another_tenant(self) -> None:
        """Every frame seen so far, checked again against every stream the database has now."""
        for peer in self.peers:
            for text in peer.texts:
                self._check_text(peer, text)


def test_isolation__no_peer_receives_or_learns_of_another_tenants_events_or_streams(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.fail("the isolation property needs DATABASE_URL=postgres://… (the relay's leases)")
    monkeypatch.setattr(EdgeRuntime, "get", classmethod(runtime_for))
    run_state_machine_as_test(
        Isolation,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
