"""Handshakes in batches (backplane/handshakes.py): sockets arriving together share their
database work, and each still gets its own answer — caps counted across the batch, a bad
token refused alone, a failing store answering 503 to the whole batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from backplane import handshakes
from harness.data import make_tenant, make_token, orm
from harness.inprocess import AsgiPeer, InProcessEdge, Refused


@pytest.fixture(autouse=True)
def fresh_throttle() -> Iterator[None]:
    from backplane import limits

    limits.throttle.cache_clear()
    yield
    limits.throttle.cache_clear()


def batches() -> handshakes.Handshakes:
    from backplane import consumers

    return handshakes.for_loop(consumers._handshakes)


async def outcome(edge: InProcessEdge, token: str) -> AsgiPeer | int:
    """The open peer, or the HTTP status its upgrade was refused with."""
    try:
        return await edge.connect(token)
    except Refused as exc:
        return exc.status


async def together(edge: InProcessEdge, tokens: Sequence[str]) -> list[AsgiPeer | int]:
    """Open peers in the same loop turn (a connect storm's sockets)."""
    return list(await asyncio.gather(*(outcome(edge, t) for t in tokens)))


# --- the batcher itself ----------------------------------------------------------------------


async def test_batcher__items_of_one_loop_turn_share_a_batch_and_get_their_own_answers(edge: InProcessEdge) -> None:
    seen: list[list[int]] = []

    def work(items: Sequence[int]) -> list[Any]:
        seen.append(list(items))
        return [ValueError(n) if n % 2 else n * 10 for n in items]

    batcher: handshakes.Batcher[int, int] = handshakes.Batcher(work)
    answers = await asyncio.gather(*(batcher.submit(n) for n in range(4)), return_exceptions=True)
    assert seen == [[0, 1, 2, 3]]
    assert answers[0] == 0 and answers[2] == 20
    assert isinstance(answers[1], ValueError) and isinstance(answers[3], ValueError)


async def test_batcher__a_failing_batch_fails_every_caller_and_the_next_batch_runs(edge: InProcessEdge) -> None:
    calls: list[list[str]] = []

    def work(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("store down")
        return [s.upper() for s in items]

    batcher: handshakes.Batcher[str, str] = handshakes.Batcher(work)
    failed = await asyncio.gather(batcher.submit("boom"), batcher.submit("a"), return_exceptions=True)
    assert all(isinstance(f, RuntimeError) for f in failed)
    assert await batcher.submit("b") == "B"
    assert calls == [["boom", "a"], ["b"]]


async def test_batcher__bounded_in_size(edge: InProcessEdge) -> None:
    sizes: list[int] = []

    def work(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    batcher: handshakes.Batcher[int, int] = handshakes.Batcher(work, max_batch=3)
    assert await asyncio.gather(*(batcher.submit(n) for n in range(7))) == list(range(7))
    assert sizes == [3, 3, 1]


# --- through the consumer ------------------------------------------------------------------------


async def test_batches__a_cap_of_n_lets_exactly_n_of_one_tokens_sockets_in(edge: InProcessEdge, settings: Any) -> None:
    settings.BACKPLANE = {**getattr(settings, "BACKPLANE", {}), "MAX_CONNECTIONS_PER_TOKEN": 3}
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-cap")
    # Another token of the device first: the runtime is started and the streams' groups
    # joined, so the five go through each step in the same loop turns.
    await edge.connect(await orm(make_token, tenant, "dev-cap"))
    opened = batches().open
    before = (opened.batches, opened.items)
    got = await together(edge, [token] * 5)
    assert (opened.batches - before[0], opened.items - before[1]) == (1, 5)  # one batch of all five
    assert sorted(g if isinstance(g, int) else 101 for g in got) == [101, 101, 101, 429, 429]
    assert await edge.refused_status(token) == 429  # the three let in count from now on


async def test_batches__a_tenant_cap_counts_across_the_batch(edge: InProcessEdge, settings: Any) -> None:
    settings.BACKPLANE = {**getattr(settings, "BACKPLANE", {}), "MAX_CONNECTIONS_PER_TENANT": 2}
    tenant = await orm(make_tenant)
    tokens = [await orm(make_token, tenant, f"dev-{n}") for n in range(4)]
    await edge.connect(await orm(make_token, await orm(make_tenant), "elsewhere"))  # the runtime started
    opened = batches().open
    before = opened.batches
    got = await together(edge, tokens)
    assert opened.batches - before == 1
    assert sum(1 for g in got if g == 429) == 2
    assert sum(1 for g in got if isinstance(g, AsgiPeer)) == 2


async def test_batches__one_bad_token_is_refused_alone(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    good = [await orm(make_token, tenant, f"dev-{n}") for n in range(2)]
    await edge.connect(await orm(make_token, tenant, "dev-warm"))  # the runtime started
    checked = batches().authenticate
    before = checked.batches
    got = await together(edge, [good[0], "tyr_not-a-token", good[1]])
    assert checked.batches - before == 1  # one lookup for the three
    assert isinstance(got[0], AsgiPeer) and isinstance(got[2], AsgiPeer)
    assert got[1] == 403


async def test_batches__the_store_failing_answers_503_to_the_whole_batch(
    edge: InProcessEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import OperationalError

    from backplane import auth

    tenant = await orm(make_tenant)
    tokens = [await orm(make_token, tenant, f"dev-{n}") for n in range(3)]

    def down(_: Any) -> Any:  # the token lookup's query fails as it is made
        raise OperationalError("the database went away")

    monkeypatch.setattr(auth, "_token_rows_of", down)
    assert await together(edge, tokens) == [503, 503, 503]
    monkeypatch.undo()
    assert all(isinstance(g, AsgiPeer) for g in await together(edge, tokens))  # back once it is


async def test_batches__opening_failing_answers_503_and_leaves_no_row(
    edge: InProcessEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import OperationalError

    from backplane import directory
    from backplane.models import Connection

    tenant = await orm(make_tenant)
    tokens = [await orm(make_token, tenant, f"dev-{n}") for n in range(3)]

    def down(*_: Any) -> Any:
        raise OperationalError("the database went away")

    monkeypatch.setattr(directory, "over_caps", down)
    assert await together(edge, tokens) == [503, 503, 503]
    assert await orm(lambda: Connection.objects.filter(device_id__startswith="dev-").count()) == 0


async def test_batches__the_process_wide_token_query_is_never_evaluated_itself(edge: InProcessEdge) -> None:
    """Each batch filters a copy of the one token query (``auth._token_rows``): rows read
    for one batch must never be cached on it and answer the next."""
    from backplane import auth

    tenant = await orm(make_tenant)
    first = await orm(make_token, tenant, "dev-a")
    assert isinstance(await outcome(edge, first), AsgiPeer)
    assert auth._token_rows()._result_cache is None
    second = await orm(make_token, tenant, "dev-b")  # made after the first batch read its rows
    assert isinstance(await outcome(edge, second), AsgiPeer)
    assert await outcome(edge, "tyr_not-a-token") == 403
    assert auth._token_rows()._result_cache is None


@pytest.mark.parametrize("dropped_at", ["authenticate", "open"])
async def test_batches__a_handshake_found_dropped_is_refused_not_left_pending(
    edge: InProcessEdge, monkeypatch: pytest.MonkeyPatch, dropped_at: str
) -> None:
    """A batch skips a socket daphne dropped while it waited; the consumer then refuses the
    upgrade (a no-op for a socket really gone), so one the check wrongly saw as dropped is
    told at once and retries, rather than waiting out daphne's handshake timeout."""
    from backplane import consumers

    token = await orm(make_token, await orm(make_tenant), "dev-d")
    real = consumers._open_batch
    if dropped_at == "authenticate":
        monkeypatch.setattr(consumers.vendor_daphne, "gone", lambda proto: True)
    else:  # let in, then dropped while its heads are read

        def open_dropped(sockets: Sequence[Any]) -> list[Any]:
            monkeypatch.setattr(consumers.vendor_daphne, "gone", lambda proto: True)
            return real(sockets)

        monkeypatch.setattr(consumers, "_open_batch", open_dropped)
    assert await edge.refused_status(token) == 403
