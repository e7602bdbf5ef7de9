"""Unit tests of what a host project relies on: settings from the environment, the Redis of
its ``CHANNEL_LAYERS``, check W060, the probes under any ``Host``, and static files."""

from __future__ import annotations

import logging

import pytest
from django.test import Client, override_settings

from backplane.checks import check_backplane_settings
from backplane.conf import DEFAULTS, conf, from_environment, layer_redis_url

PUBSUB = "channels_redis.pubsub.RedisPubSubChannelLayer"


def test_from_environment__reads_known_keys_as_json_lists_or_strings():
    environ = {
        "BACKPLANE_RETENTION_SECS": "60",
        "BACKPLANE_REDACT_PATTERNS": '["pin"]',
        "BACKPLANE_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "BACKPLANE_MAX_CONNECTIONS_PER_TENANT": "null",
        "BACKPLANE_PREPARED_STATEMENTS": "false",
        "PATH": "/bin",
    }

    assert from_environment(environ) == {
        "RETENTION_SECS": 60,
        "REDACT_PATTERNS": ["pin"],
        "ALLOWED_ORIGINS": ["https://a.example", "https://b.example"],
        "MAX_CONNECTIONS_PER_TENANT": None,
        "PREPARED_STATEMENTS": False,
    }


def test_from_environment__kubernetes_service_variables_are_ignored_with_a_warning(caplog):
    environ = {
        "BACKPLANE_SERVICE_HOST": "10.0.0.7",
        "BACKPLANE_PORT": "tcp://10.0.0.7:8000",
        "BACKPLANE_PORT_8000_TCP_ADDR": "10.0.0.7",
        "BACKPLANE_SHARDS": "4",
    }

    with caplog.at_level(logging.WARNING, logger="backplane.conf"):
        assert from_environment(environ) == {"SHARDS": 4}

    [record] = caplog.records
    assert "BACKPLANE_PORT, BACKPLANE_PORT_8000_TCP_ADDR, BACKPLANE_SERVICE_HOST" in record.getMessage()


def test_from_environment__non_key_variables_pass_silently(caplog):
    environ = {"BACKPLANE_CHANNEL_PREFIX": "x", "BACKPLANE_LAYER": "core", "BACKPLANE_LAYER_CAPACITY": "10"}

    with caplog.at_level(logging.WARNING, logger="backplane.conf"):
        assert from_environment(environ) == {}
    assert caplog.records == []


def test_from_environment__every_key_is_read():
    environ = {f"BACKPLANE_{key}": "1" for key in DEFAULTS}

    assert set(from_environment(environ)) == set(DEFAULTS)


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["redis://10.0.0.1:6379/2"], "redis://10.0.0.1:6379/2"),
        ([("redis", 6380)], "redis://redis:6380"),
        ([{"address": "rediss://r:6379/0", "ssl_cert_reqs": None}], "rediss://r:6379/0"),
        ([{"address": ("redis", 6379), "password": "p@ss"}], "redis://:p%40ss@redis:6379"),
        ([{"host": "redis", "port": 7000}], "redis://redis:7000"),
        ([{"sentinels": [("s", 26379)], "master_name": "m"}], ""),
        ([], ""),
    ],
)
def test_layer_redis_url__from_channels_redis_host_forms(hosts, expected):
    assert layer_redis_url({"default": {"BACKEND": PUBSUB, "CONFIG": {"hosts": hosts}}}) == expected


def test_conf__redis_url_falls_back_to_the_channel_layer():
    layers = {"default": {"BACKEND": PUBSUB, "CONFIG": {"hosts": ["redis://127.0.0.1:6379/4"]}}}

    with override_settings(REDIS_URL="", CHANNEL_LAYERS=layers):
        assert conf.redis_url == "redis://127.0.0.1:6379/4"
    with override_settings(REDIS_URL="redis://127.0.0.1:6379/5", CHANNEL_LAYERS=layers):
        assert conf.redis_url == "redis://127.0.0.1:6379/5"


def _ids(**overrides: object) -> list[str]:
    with override_settings(SECRET_KEY="a-real-secret", **overrides):
        return [message.id for message in check_backplane_settings()]


def test_checks__w060_a_redis_layer_without_a_url_for_the_doorbell():
    sentinel = {
        "default": {"BACKEND": PUBSUB, "CONFIG": {"hosts": [{"sentinels": [("s", 26379)], "master_name": "m"}]}}
    }
    plain = {"default": {"BACKEND": PUBSUB, "CONFIG": {"hosts": ["redis://127.0.0.1:6379/0"]}}}
    memory = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

    assert "backplane.W060" in _ids(REDIS_URL="", CHANNEL_LAYERS=sentinel)
    assert "backplane.W060" not in _ids(REDIS_URL="redis://127.0.0.1:6379/0", CHANNEL_LAYERS=sentinel)
    assert "backplane.W060" not in _ids(REDIS_URL="", CHANNEL_LAYERS=plain)
    assert "backplane.W060" not in _ids(REDIS_URL="", CHANNEL_LAYERS=memory)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz"])
def test_probes__answer_whatever_the_host(path):
    with override_settings(ALLOWED_HOSTS=["gateway.example"], SECURE_SSL_REDIRECT=True):
        probe = Client(HTTP_HOST="10.1.2.3:8000").get(path)
        other = Client(HTTP_HOST="10.1.2.3:8000").get("/admin/login/")

    assert (probe.status_code, probe.json()) == (200, {"ok": True})
    assert other.status_code == 400  # the rest of the site still refuses the unknown Host


def test_probes__readyz_fails_while_an_edge_drains(monkeypatch):
    from backplane import views

    monkeypatch.setattr(views, "_draining", lambda: True)

    response = Client().get("/readyz")

    assert (response.status_code, response.json()) == (503, {"ok": False, "edge": "draining"})
    assert Client().get("/livez").status_code == 200


def test_static__admin_css_is_served_by_the_application():
    response = Client().get("/static/admin/css/base.css")

    assert response.status_code == 200
    assert b"".join(response.streaming_content).strip()  # type: ignore[attr-defined]


def test_checks__e060_no_default_channel_layer():
    assert "backplane.E060" in _ids(CHANNEL_LAYERS={})
    assert "backplane.E060" not in _ids()
