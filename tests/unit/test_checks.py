"""Unit tests of the ``BACKPLANE`` system checks: each id fires for a bad setting, none for defaults."""

from __future__ import annotations

import typing

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from backplane import checks
from backplane.checks import check_backplane_settings
from backplane.conf import DEFAULTS, Setting, Settings

# Not the development key, so that W001 (tested on its own) stays out of the other checks' way.
A_SECRET_KEY = "a-real-secret"


def ids(**overrides: object) -> list[str]:
    overrides.setdefault("SECRET_KEY", A_SECRET_KEY)
    with override_settings(**overrides):
        return [error.id for error in check_backplane_settings()]


def test_checks__every_setting_is_checked_as_conf_declares_it():
    declared = {name: typing.get_args(hint)[0] for name, hint in typing.get_type_hints(Settings).items()
                if typing.get_origin(hint) is Setting}

    assert {name for name, t in declared.items() if t is int} == set(checks._POSITIVE_INTS)
    assert {name for name, t in declared.items() if t is float} == set(checks._POSITIVE_NUMBERS)
    assert set(declared) == set(DEFAULTS)


def test_checks__project_settings_pass():
    assert check_backplane_settings() == []


def test_checks__explicit_defaults_pass():
    assert ids(BACKPLANE=dict(DEFAULTS)) == []
    assert ids(BACKPLANE={}) == []


def test_checks__e001_backplane_not_a_dict():
    assert ids(BACKPLANE=["SHARDS", 4]) == ["backplane.E001"]


def test_checks__e002_unknown_key():
    errors = ids(BACKPLANE={"SHARD": 4})

    assert errors == ["backplane.E002"]


@pytest.mark.parametrize("key", ["SHARDS", "MAX_PAYLOAD_BYTES", "RELAY_BATCH_SIZE", "LIVE_HOLD_MS", "INBOUND_BURST"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "4", True, None])
def test_checks__e003_positive_integers(key, value):
    assert ids(BACKPLANE={key: value}) == ["backplane.E003"]


@pytest.mark.parametrize("key", ["RELAY_POLL_INTERVAL_SECS", "RETENTION_SECS", "INBOUND_RATE_PER_SEC"])
@pytest.mark.parametrize("value", [0, -0.5, "1", False, None])
def test_checks__e004_positive_numbers(key, value):
    assert ids(BACKPLANE={key: value}) == ["backplane.E004"]


def test_checks__e004_accepts_fractions():
    assert ids(BACKPLANE={"RELAY_POLL_INTERVAL_SECS": 0.05, "RETENTION_SECS": 60}) == []


def test_checks__e005_ttl_not_more_than_twice_heartbeat():
    assert ids(BACKPLANE={"HEARTBEAT_INTERVAL_SECS": 10, "CONNECTION_TTL_SECS": 20}) == ["backplane.E005"]
    assert ids(BACKPLANE={"HEARTBEAT_INTERVAL_SECS": 10, "CONNECTION_TTL_SECS": 21}) == []


@pytest.mark.parametrize("value", ["password", ["password", ""], [None], [1]])
def test_checks__e006_redact_patterns(value):
    assert ids(BACKPLANE={"REDACT_PATTERNS": value}) == ["backplane.E006"]


@pytest.mark.parametrize("value", ["https://ops.example", ["ops.example"], [None]])
def test_checks__e007_allowed_origins(value):
    assert ids(BACKPLANE={"ALLOWED_ORIGINS": value}) == ["backplane.E007"]


def test_checks__e007_accepts_origin_list():
    assert ids(BACKPLANE={"ALLOWED_ORIGINS": ["https://ops.example", "http://127.0.0.1:8000"]}) == []


@pytest.mark.parametrize("key", ["COMPACT_MAX_ROWS", "COMPACT_MAX_BYTES"])
@pytest.mark.parametrize("value", [0, -5, "100", True])
def test_checks__e008_compaction_budgets(key, value):
    assert ids(BACKPLANE={key: value}) == ["backplane.E008"]


def test_checks__e008_accepts_none_and_positive():
    assert ids(BACKPLANE={"COMPACT_MAX_ROWS": None, "COMPACT_MAX_BYTES": 10_000_000}) == []


def test_checks__e009_layer():
    assert ids(BACKPLANE_LAYER="memory") == ["backplane.E009"]
    assert ids(BACKPLANE_LAYER="core") == []


def test_checks__e010_redis_url():
    assert ids(REDIS_URL="http://127.0.0.1:6379") == ["backplane.E010"]
    assert ids(REDIS_URL="rediss://cache.example:6380/0") == []
    assert ids(REDIS_URL="") == []


@pytest.mark.parametrize("value", [1, "yes", None])
def test_checks__e011_prepared_statements(value):
    assert ids(BACKPLANE={"PREPARED_STATEMENTS": value}) == ["backplane.E011"]
    assert ids(BACKPLANE={"PREPARED_STATEMENTS": False}) == []


def test_checks__every_error_has_a_hint():
    with override_settings(BACKPLANE={"SHARDS": 0, "RETENTION_SECS": 0, "REDACT_PATTERNS": "x",
                                      "ALLOWED_ORIGINS": "x", "COMPACT_MAX_ROWS": 0, "NOPE": 1,
                                      "PREPARED_STATEMENTS": "x"},
                           BACKPLANE_LAYER="x", REDIS_URL="x://", SECRET_KEY=A_SECRET_KEY):
        errors = check_backplane_settings()

    assert sorted(e.id for e in errors) == [
        "backplane.E002", "backplane.E003", "backplane.E004", "backplane.E006",
        "backplane.E007", "backplane.E008", "backplane.E009", "backplane.E010", "backplane.E011",
    ]
    assert all(e.hint for e in errors)


def test_checks__registered_with_manage_check():
    with override_settings(BACKPLANE={"SHARDS": 0}), pytest.raises(SystemCheckError, match="backplane.E003"):
        call_command("check")


def test_checks__w001_development_secret_key_in_a_cluster() -> None:
    from backplane.checks import check_backplane_settings
    from backplane.conf import DEVELOPMENT_SECRET_KEY

    with override_settings(SECRET_KEY=DEVELOPMENT_SECRET_KEY, REDIS_URL="redis://127.0.0.1:6379/0", DEBUG=False):
        assert [m.id for m in check_backplane_settings()] == ["backplane.W001"]
    with override_settings(SECRET_KEY=DEVELOPMENT_SECRET_KEY, REDIS_URL="", DEBUG=False):  # embedded: fine
        assert check_backplane_settings() == []
    with override_settings(SECRET_KEY="a-real-secret", REDIS_URL="redis://127.0.0.1:6379/0", DEBUG=False):
        assert check_backplane_settings() == []
