"""The example project's security settings come from the environment (issue 13, safe
defaults), and the upgrade checks that need no server: URL credentials split on ``;``, the
development SECRET_KEY refused for cluster processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from backplane import auth
from backplane.conf import DEVELOPMENT_SECRET_KEY

NAMES = [
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
    "CSRF_TRUSTED_ORIGINS",
]


def settings_under(env: dict[str, str]) -> dict[str, object]:
    code = f"import json, tyrum.settings as s; print(json.dumps({{n: getattr(s, n) for n in {NAMES!r}}}))"
    clean = {k: v for k, v in __import__("os").environ.items() if k not in NAMES}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_settings__https_ones_are_off_by_default() -> None:
    got = settings_under({})
    assert got == {
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_SSL_REDIRECT": False,
        "SECURE_HSTS_SECONDS": 0,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False,
        "SECURE_PROXY_SSL_HEADER": None,
        "CSRF_TRUSTED_ORIGINS": [],
    }


def test_settings__https_ones_come_from_the_environment() -> None:
    got = settings_under(
        {
            "SESSION_COOKIE_SECURE": "1",
            "CSRF_COOKIE_SECURE": "true",
            "SECURE_SSL_REDIRECT": "yes",
            "SECURE_HSTS_SECONDS": "31536000",
            "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
            "SECURE_HSTS_PRELOAD": "1",
            "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
            "CSRF_TRUSTED_ORIGINS": "https://ops.example, https://admin.example",
        }
    )
    assert got == {
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "CSRF_TRUSTED_ORIGINS": ["https://ops.example", "https://admin.example"],
    }


@pytest.mark.parametrize(
    "query,refused",
    [
        (b"token=x", True),
        (b"a=1;token=x", True),
        (b"a=1;%20Access_Token=x", True),
        (b"a=1&b=2;c=3", False),
        (b"tenant=acme", False),
        (b"", False),
    ],
)
def test_url_credential__names_split_on_ampersands_and_semicolons(query: bytes, refused: bool) -> None:
    assert auth.url_has_credential(query) is refused


def test_refuse_unsafe_start__only_a_cluster_process_on_the_development_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from backplane.asgi import refuse_unsafe_start
    from backplane.conf import Settings

    cluster = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {}}}
    embedded = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with override_settings(SECRET_KEY=DEVELOPMENT_SECRET_KEY, DEBUG=False, CHANNEL_LAYERS=cluster):
        with pytest.raises(ImproperlyConfigured, match="development SECRET_KEY"):
            refuse_unsafe_start("an edge")
    with override_settings(SECRET_KEY=DEVELOPMENT_SECRET_KEY, DEBUG=True, CHANNEL_LAYERS=cluster):
        refuse_unsafe_start("an edge")  # a development machine
    with override_settings(SECRET_KEY="a-real-secret-key", DEBUG=False, CHANNEL_LAYERS=cluster):
        refuse_unsafe_start("an edge")
    monkeypatch.setattr(Settings, "is_postgresql", property(lambda self: False))
    with override_settings(SECRET_KEY=DEVELOPMENT_SECRET_KEY, DEBUG=False, CHANNEL_LAYERS=embedded):
        refuse_unsafe_start("an edge")  # serve's embedded mode (SQLite, in-process layer)
    monkeypatch.setattr(Settings, "is_postgresql", property(lambda self: True))
    with override_settings(SECRET_KEY=DEVELOPMENT_SECRET_KEY, DEBUG=False, CHANNEL_LAYERS=embedded):
        with pytest.raises(ImproperlyConfigured):
            refuse_unsafe_start("an edge")  # serve on a shared PostgreSQL is a cluster member
