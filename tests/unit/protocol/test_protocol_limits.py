"""Issue 13's limits, in process: connection caps, the throttle of failed authentications,
the Host check, unknown paths, URL credentials split on ``;``, malformed JSON, and replays
read page by page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.data import events, make_tenant, make_token, orm, publish_many
from harness.inprocess import InProcessEdge


@pytest.fixture(autouse=True)
def fresh_throttle() -> Iterator[None]:
    """Each test starts with an edge that has seen no failed authentication (the throttle is
    per process, made from the settings at first use)."""
    from backplane import limits

    limits.throttle.cache_clear()
    yield
    limits.throttle.cache_clear()


def backplane_settings(settings: Any, **values: Any) -> None:
    settings.BACKPLANE = {**getattr(settings, "BACKPLANE", {}), **values}


# --- connection caps ---------------------------------------------------------------------


async def test_caps__a_token_past_its_cap_is_refused_429_until_one_closes(edge: InProcessEdge, settings: Any) -> None:
    backplane_settings(settings, MAX_CONNECTIONS_PER_TOKEN=2)
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-cap")
    first = await edge.connect(token)
    await edge.connect(token)
    assert await edge.refused_status(token) == 429
    other = await orm(make_token, tenant, "dev-cap")  # another token of the same device: its own cap
    await edge.connect(other)
    await first.close()
    await edge.connect(token)  # a slot is free again


async def test_caps__a_tenant_past_its_cap_is_refused_429(edge: InProcessEdge, settings: Any) -> None:
    backplane_settings(settings, MAX_CONNECTIONS_PER_TENANT=2)
    tenant, elsewhere = await orm(make_tenant), await orm(make_tenant)
    for n in range(2):
        await edge.connect(await orm(make_token, tenant, f"dev-{n}"))
    assert await edge.refused_status(await orm(make_token, tenant, "dev-9")) == 429
    await edge.connect(await orm(make_token, elsewhere, "dev-0"))  # another tenant is not affected


async def test_caps__none_means_no_cap(edge: InProcessEdge, settings: Any) -> None:
    backplane_settings(settings, MAX_CONNECTIONS_PER_TOKEN=None)
    token = await orm(make_token, await orm(make_tenant), "dev-many")
    for _ in range(40):  # more than the default cap
        await edge.connect(token)


# --- failed authentications per client address ------------------------------------------


async def test_throttle__past_the_burst_an_address_gets_429_before_any_credential_check(
    edge: InProcessEdge, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backplane import auth

    backplane_settings(settings, AUTH_FAILURE_BURST=3, AUTH_FAILURES_PER_MINUTE=1.0)
    good = await orm(make_token, await orm(make_tenant), "dev-ok")
    for n in range(3):
        assert await edge.refused_status(f"tyr_not-a-token-{n}") == 403
    checks: list[Any] = []
    real = auth.authenticate_many  # what the edge's handshake batches call
    monkeypatch.setattr(auth, "authenticate_many", lambda scopes: checks.extend(scopes) or real(scopes))
    assert await edge.refused_status(good) == 429  # even a good token: the address is throttled
    assert await edge.refused_status("tyr_another-guess") == 429
    assert checks == []  # refused before the credential was even looked up


async def test_throttle__successes_do_not_spend_the_budget(edge: InProcessEdge, settings: Any) -> None:
    backplane_settings(settings, AUTH_FAILURE_BURST=2, AUTH_FAILURES_PER_MINUTE=1.0)
    good = await orm(make_token, await orm(make_tenant), "dev-ok")
    for _ in range(5):
        await (await edge.connect(good)).close()
    assert await edge.refused_status("tyr_wrong") == 403


# --- the upgrade request -------------------------------------------------------------------


async def test_host__not_in_allowed_hosts_is_refused_400(edge: InProcessEdge) -> None:
    token = await orm(make_token, await orm(make_tenant), "dev-h")
    assert await edge.refused_status(token, headers={"Host": "evil.example"}) == 400
    assert await edge.refused_status(token, headers={"Host": "evil.example:443"}) == 400
    await edge.connect(token, headers={"Host": "localhost:8000"})


async def test_path__an_upgrade_to_another_path_is_refused_404(edge: InProcessEdge) -> None:
    token = await orm(make_token, await orm(make_tenant), "dev-p")
    assert await edge.refused_status(token, path="/nope") == 404
    assert await edge.refused_status(token, path="/ws/extra") == 404


@pytest.mark.parametrize("query", ["x=1;token=abc", "a=b;Access_Token=abc", "jwt=abc;x=1"])
async def test_url_credential__split_on_semicolons_too_is_refused(edge: InProcessEdge, query: str) -> None:
    token = await orm(make_token, await orm(make_tenant), "dev-u")
    assert await edge.refused_status(token, path=f"/ws?{query}") == 403


@pytest.mark.parametrize(
    "text", ['{"type":"ping","x":NaN}', '{"type":"ping","x":-Infinity}', "[" * 50_000 + "]" * 50_000]
)
async def test_frames__nan_infinity_and_deep_nesting_close_4400_not_4001(
    edge: InProcessEdge, settings: Any, text: str
) -> None:
    backplane_settings(settings, MAX_INBOUND_FRAME_BYTES=200_000)
    peer = await edge.connect(await orm(make_token, await orm(make_tenant), "dev-j"))
    await peer.send(text)
    assert await peer.closed() == 4400


# --- replays page by page ------------------------------------------------------------------


async def test_replay__reads_the_outbox_a_page_at_a_time(
    edge: InProcessEdge, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backplane.store import get_store

    backplane_settings(settings, REPLAY_PAGE_EVENTS=10)
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-r")
    first = await edge.connect(token)
    epoch = first.hello["streams"]["device"]["epoch"]
    await first.close()
    await orm(publish_many, tenant, events(25, "missed", device="dev-r"))
    await edge.forward()

    store = get_store()
    reads: list[tuple[int, int]] = []
    real = store.read_range

    def read_range(key: str, after: int, upto: int) -> Any:
        reads.append((after, upto))
        return real(key, after, upto)

    monkeypatch.setattr(store, "read_range", read_range)
    again = await edge.connect(token)
    await again.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 0}}})
    assert await again.until_resumed() == {"device": {"recovered": True, "replayed": 25}}
    assert [e["offset"] for e in again.events] == list(range(1, 26))
    assert reads == [(0, 10), (10, 20), (20, 25)]
