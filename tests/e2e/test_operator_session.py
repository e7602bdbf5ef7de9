"""An operator's cookie socket ends with the session (issue 13, point 5): a real daphne edge
closes it within a heartbeat of logout (4008), password change (4008) or session expiry
(4401), while the operator's other sessions and token peers stay served.

The sessions are made and ended by Django itself (the test client's login, the admin's
logout and password change views) on the database the edge reads. Before the change these
sockets stayed open: each test timed out waiting for the close.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.conf import settings

from harness.cluster import Cluster
from harness.data import make_tenant, make_token, orm
from harness.peer import OPERATOR_ORIGIN, Peer, refused_status

pytestmark = pytest.mark.e2e

# The edge beats every second (the default is 5 s); a close is due within one beat of the
# change, bounded here at two beats plus the time to start the query and send the frame.
HEARTBEAT_SECS = 1
CLOSE_BOUND_SECS = 2 * HEARTBEAT_SECS + 1.0
PASSWORD = "operator-pass-1"  # noqa: S105  (a test user's)


@pytest.fixture(scope="module")
def module_cluster(module_env, tmp_path_factory):  # type: ignore[no-untyped-def]
    cluster = Cluster(log_dir=tmp_path_factory.mktemp("logs"), env=module_env)
    try:
        cluster.start_edges(
            ["e2e-opsession-a"],
            BACKPLANE_HEARTBEAT_INTERVAL_SECS=str(HEARTBEAT_SECS),
            BACKPLANE_ALLOWED_ORIGINS=OPERATOR_ORIGIN,
        )
        yield cluster
    finally:
        cluster.stop()


def make_operator(tenant: Any) -> Any:
    from django.contrib.auth import get_user_model

    from backplane.models import OperatorAccess

    user = get_user_model().objects.create_user(f"op-{tenant.slug}", password=PASSWORD, is_staff=True)
    OperatorAccess.objects.create(user=user, tenant=tenant)
    return user


def log_in(user: Any) -> Any:
    """A browser's session: Django's own login, through the test client."""
    from django.test import Client

    client = Client()
    assert client.login(username=user.get_username(), password=PASSWORD)
    return client


def cookie(client: Any) -> dict[str, str]:
    return {
        "Cookie": f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}",
        "Origin": OPERATOR_ORIGIN,
    }


async def still_open(peer: Peer) -> None:
    await peer.send({"type": "ping"})
    await peer.until(lambda p: p.frames[-1:] == [{"type": "pong"}], what="pong")


async def closed_within(peer: Peer, since: float) -> tuple[int, float]:
    try:
        code = await peer.closed(timeout=CLOSE_BOUND_SECS + 2)
    except TimeoutError:
        raise AssertionError("the socket stayed open") from None
    return code, time.monotonic() - since


async def test_operator_session__logout_closes_its_socket_within_a_heartbeat(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    user = await orm(make_operator, tenant)
    laptop, phone = await orm(log_in, user), await orm(log_in, user)
    by_laptop = await peers(cluster.urls[0], headers=cookie(laptop))
    by_phone = await peers(cluster.urls[0], headers=cookie(phone))
    device = await peers(cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    laptop_cookie = cookie(laptop)

    logout = await orm(laptop.post, "/admin/logout/")
    since = time.monotonic()

    assert logout.status_code == 200
    code, took = await closed_within(by_laptop, since)
    assert code == 4008
    assert took <= CLOSE_BOUND_SECS, took
    await still_open(by_phone)  # the operator's other session is not logged out
    await still_open(device)
    assert await refused_status(cluster.urls[0], headers=laptop_cookie) == 403


async def test_operator_session__password_change_closes_every_session_socket(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    user = await orm(make_operator, tenant)
    laptop, phone = await orm(log_in, user), await orm(log_in, user)
    by_laptop = await peers(cluster.urls[0], headers=cookie(laptop))
    by_phone = await peers(cluster.urls[0], headers=cookie(phone))
    device = await peers(cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    phone_cookie = cookie(phone)

    change = await orm(
        laptop.post,
        "/admin/password_change/",
        {"old_password": PASSWORD, "new_password1": "a-new-pass-2", "new_password2": "a-new-pass-2"},
    )
    since = time.monotonic()

    assert change.status_code == 302, change.content[-2000:]
    codes = [await closed_within(by_laptop, since), await closed_within(by_phone, since)]
    assert [code for code, _ in codes] == [4008, 4008]
    assert max(took for _, took in codes) <= CLOSE_BOUND_SECS, codes
    await still_open(device)
    assert await refused_status(cluster.urls[0], headers=phone_cookie) == 403
    # The session that changed the password goes on under its new key (Django cycles it).
    again = await peers(cluster.urls[0], headers=cookie(laptop))
    await still_open(again)


async def test_operator_session__expiry_closes_with_4401(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    user = await orm(make_operator, tenant)
    browser, other = await orm(log_in, user), await orm(log_in, user)
    lifetime = 2

    def expire_soon() -> None:
        session = browser.session
        session.set_expiry(lifetime)
        session.save()

    await orm(expire_soon)
    connected = time.monotonic()
    by_browser = await peers(cluster.urls[0], headers=cookie(browser))
    by_other = await peers(cluster.urls[0], headers=cookie(other))

    code, took = await closed_within(by_browser, connected)

    assert code == 4401
    assert lifetime - 0.5 <= took <= lifetime + CLOSE_BOUND_SECS, took
    await still_open(by_other)
