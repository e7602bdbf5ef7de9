"""Unit tests of ``backplane.conf``: defaults, settings read at access time, declared types."""

from __future__ import annotations

import typing
from collections.abc import Sequence

import pytest
from django.test import override_settings

from backplane.conf import DEFAULTS, Setting, Settings, conf, edge_id

HINTS = typing.get_type_hints(Settings)
DECLARED = {name: typing.get_args(hint)[0] for name, hint in HINTS.items() if typing.get_origin(hint) is Setting}


def conforms(value: object, declared: object) -> bool:
    """Whether ``value`` is of the type a setting declares (the few shapes conf uses)."""
    if declared is bool:
        return isinstance(value, bool)
    if declared is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if declared is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if declared == int | None:
        return value is None or conforms(value, int)
    if typing.get_origin(declared) is Sequence:
        (item,) = typing.get_args(declared)
        return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, item) for v in value)
    raise AssertionError(f"no rule for {declared!r}")


def test_conf__defaults_lists_every_setting_in_declaration_order():
    assert list(DEFAULTS) == list(DECLARED)
    assert list(DEFAULTS)[:3] == ["SHARDS", "MAX_PAYLOAD_BYTES", "RELAY_BATCH_SIZE"]


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_conf__default_is_of_the_declared_type(name):
    assert conforms(DEFAULTS[name], DECLARED[name]), (name, DEFAULTS[name], DECLARED[name])


def test_conf__declared_types():
    assert DECLARED["SHARDS"] is int
    assert DECLARED["HEARTBEAT_INTERVAL_SECS"] is float
    assert DECLARED["PREPARED_STATEMENTS"] is bool
    assert DECLARED["COMPACT_MAX_ROWS"] == int | None
    assert DECLARED["REDACT_PATTERNS"] == Sequence[str]


@override_settings(BACKPLANE={})
def test_conf__unset_keys_read_their_defaults():
    for name, default in DEFAULTS.items():
        assert getattr(conf, name) == default, name
    assert (conf.SHARDS, conf.HEARTBEAT_INTERVAL_SECS, conf.COMPACT_MAX_ROWS) == (16, 5.0, None)
    assert "*password" in conf.REDACT_PATTERNS


def test_conf__no_backplane_setting_reads_defaults(settings):
    del settings.BACKPLANE

    assert conf.SHARDS == 16
    assert conf.ALLOWED_ORIGINS == []


def test_conf__override_settings_applies_at_access_time():
    with override_settings(BACKPLANE={"SHARDS": 4, "HEARTBEAT_INTERVAL_SECS": 1.5}):
        assert conf.SHARDS == 4
        assert conf.HEARTBEAT_INTERVAL_SECS == 1.5
        assert conf.CONNECTION_TTL_SECS == DEFAULTS["CONNECTION_TTL_SECS"]
        with override_settings(BACKPLANE={"SHARDS": 2}):
            assert conf.SHARDS == 2
            assert conf.HEARTBEAT_INTERVAL_SECS == 5.0
        assert conf.SHARDS == 4
    with override_settings(BACKPLANE={}):
        assert conf.SHARDS == 16


def test_conf__settings_fixture_applies(settings):
    settings.BACKPLANE = {"ALLOWED_ORIGINS": ["https://ops.example"], "PREPARED_STATEMENTS": False}

    assert conf.ALLOWED_ORIGINS == ["https://ops.example"]
    assert conf.PREPARED_STATEMENTS is False


def test_conf__values_are_not_converted():
    # checks.py reports a wrong type (backplane.E003); conf hands the value over as it is.
    with override_settings(BACKPLANE={"SHARDS": "4"}):
        assert conf.SHARDS == "4"
        assert conf._get("SHARDS") == "4"


def test_conf__unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError):
        conf.SHARD
    assert not hasattr(conf, "NOPE")
    with pytest.raises(KeyError):
        conf._get("SHARD")


def test_conf__settings_are_read_only():
    with pytest.raises(AttributeError):
        conf.SHARDS = 3
    assert conf.SHARDS == Settings().SHARDS


def test_conf__class_access_gives_the_setting():
    assert isinstance(Settings.SHARDS, Setting)
    assert (Settings.SHARDS.name, Settings.SHARDS.default) == ("SHARDS", 16)


def test_conf__deployment_properties():
    redis_layer = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"}}
    memory_layer = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    url = "redis://127.0.0.1:6379/3"
    with override_settings(BACKPLANE_CHANNEL_PREFIX="tyrumx", REDIS_URL=url, CHANNEL_LAYERS=redis_layer):
        assert (conf.channel_prefix, conf.redis_url, conf.embedded_layer) == ("tyrumx", url, False)
    with override_settings(REDIS_URL=None, CHANNEL_LAYERS=memory_layer):
        assert (conf.redis_url, conf.embedded_layer) == ("", True)


def test_conf__is_postgresql():
    for engine, expected in [("django.db.backends.postgresql", True), ("django.db.backends.sqlite3", False)]:
        # Django warns about overriding DATABASES; nothing here opens a connection.
        with pytest.warns(UserWarning, match="DATABASES"), override_settings(DATABASES={"default": {"ENGINE": engine}}):
            assert conf.is_postgresql is expected


def test_conf__edge_id(settings, monkeypatch):
    monkeypatch.delenv("EDGE_ID", raising=False)
    settings.EDGE_ID = "edge-a"
    assert edge_id(8001) == "edge-a"

    settings.EDGE_ID = ""
    assert edge_id(8001).endswith("-8001")
    assert edge_id().rsplit("-", 1)[1].startswith("pid")
    assert len(edge_id(8001)) <= 64
