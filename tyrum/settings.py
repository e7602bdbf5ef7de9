"""Django settings for the Tyrum gateway.

Everything that differs between deployments comes from the environment:

- ``DATABASE_URL``: ``postgres://…`` or ``sqlite:///…``; unset means a SQLite file
  ``var/tyrum.sqlite3`` in the project (the embedded mode).
- ``REDIS_URL``: ``redis://…``; unset means the in-process channel layer, which only
  works when every part runs in one process (``manage.py serve``).
- ``EDGE_ID``: this process's stable edge identity (default: host name and port).
- ``SECRET_KEY``: required outside ``DEBUG``; the embedded default is for development only.
- ``BACKPLANE_CHANNEL_PREFIX``: per-deployment prefix of every Redis key and channel.
- ``BACKPLANE_LAYER``: ``pubsub`` (default) or ``core`` channels-redis layer.
- ``BACKPLANE_LAYER_CAPACITY``: the core layer's per-channel capacity.
- ``BACKPLANE_REDIS_KEYS``: comma-separated keys encrypting every message on Redis (the first
  encrypts, all decrypt); ``BACKPLANE_REDIS_TRUSTED=true`` runs a cluster without them.
- ``BACKPLANE_<KEY>``: any key of ``backplane/conf.py`` (``backplane.conf.from_environment``),
  e.g. ``BACKPLANE_SHARDS=16``, ``BACKPLANE_ALLOWED_ORIGINS=https://a,https://b``.
- ``DEBUG``, ``ALLOWED_HOSTS`` (comma-separated, also checked on ``/ws`` upgrades), ``LOG_LEVEL``.
- ``LOG_FORMAT=json``: every process writes one JSON object per line (``backplane/logs.py``).
- Behind TLS: ``SESSION_COOKIE_SECURE``, ``CSRF_COOKIE_SECURE``, ``SECURE_SSL_REDIRECT`` (1/0),
  ``SECURE_HSTS_SECONDS`` (with ``SECURE_HSTS_INCLUDE_SUBDOMAINS``, ``SECURE_HSTS_PRELOAD``),
  ``SECURE_PROXY_SSL_HEADER`` (``HEADER,value``, e.g. ``HTTP_X_FORWARDED_PROTO,https``: only
  behind a proxy that sets it), ``CSRF_TRUSTED_ORIGINS`` (comma-separated origins).

The ``BACKPLANE`` dict holds the backplane's own settings; ``backplane/conf.py`` documents
each key and its default, and ``manage.py check`` validates them (ids ``backplane.E00x``).
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

from backplane.conf import channel_layers, from_environment, redis_keys
from backplane.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = os.environ.get("DEBUG", "0").lower() in {"1", "true", "yes"}
SECRET_KEY = os.environ.get("SECRET_KEY", "tyrum-embedded-development-key-change-me")
ALLOWED_HOSTS = _env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")


def _env_flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    return default if raw is None else raw.strip().lower() in {"1", "true", "yes", "on"}


# HTTPS deployments (docs/security.md): all off by default, for the embedded mode on plain HTTP.
SESSION_COOKIE_SECURE = _env_flag("SESSION_COOKIE_SECURE")
CSRF_COOKIE_SECURE = _env_flag("CSRF_COOKIE_SECURE")
SECURE_SSL_REDIRECT = _env_flag("SECURE_SSL_REDIRECT")
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "0") or 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_flag("SECURE_HSTS_INCLUDE_SUBDOMAINS")
SECURE_HSTS_PRELOAD = _env_flag("SECURE_HSTS_PRELOAD")
_proxy_ssl = _env_list("SECURE_PROXY_SSL_HEADER")
SECURE_PROXY_SSL_HEADER = (_proxy_ssl[0], _proxy_ssl[1]) if len(_proxy_ssl) == 2 else None
CSRF_TRUSTED_ORIGINS = _env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "backplane",
]

MIDDLEWARE = [
    "backplane.views.ProbeMiddleware",  # first: probes come by IP address, over plain HTTP
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # the admin's CSS from serve and daphne edges alike
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tyrum.urls"
ASGI_APPLICATION = "tyrum.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- StateStore -------------------------------------------------------------------------
_default_sqlite = BASE_DIR / "var" / "tyrum.sqlite3"
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{_default_sqlite}"
_db = dj_database_url.parse(DATABASE_URL)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    Path(_db["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Several processes (serve, publish_event, create_token) share the file: WAL lets
    # readers run beside the writer, IMMEDIATE avoids lock upgrades that deadlock, and the
    # busy timeout makes a second writer wait instead of failing.
    _db["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    _db["TEST"] = {"NAME": str(_default_sqlite.with_name("test.sqlite3"))}
else:
    # Edges are long-lived: keep connections and check them before reuse, instead of
    # Django's default of one PostgreSQL connection per database call (DESIGN.md).
    _db["CONN_MAX_AGE"] = int(os.environ.get("CONN_MAX_AGE", "600"))
    _db["CONN_HEALTH_CHECKS"] = True
    _db.setdefault("OPTIONS", {})["connect_timeout"] = 5
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Transport --------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
BACKPLANE_CHANNEL_PREFIX = os.environ.get("BACKPLANE_CHANNEL_PREFIX", "tyrum")
BACKPLANE_LAYER = os.environ.get("BACKPLANE_LAYER", "pubsub")

# Every message on Redis is encrypted and authenticated with BACKPLANE_REDIS_KEYS
# (comma-separated; the first encrypts, all decrypt); without keys, `manage.py check` fails
# unless BACKPLANE_REDIS_TRUSTED=true (docs/operations.md).
CHANNEL_LAYERS = channel_layers(
    REDIS_URL,
    prefix=BACKPLANE_CHANNEL_PREFIX,
    layer=BACKPLANE_LAYER,
    keys=redis_keys(),
    capacity=int(os.environ.get("BACKPLANE_LAYER_CAPACITY", "1000")),
)

EDGE_ID = os.environ.get("EDGE_ID", "")

# Every BACKPLANE key can be set as BACKPLANE_<KEY>=<JSON value> in the environment, e.g.
# BACKPLANE_RETENTION_SECS=60 or BACKPLANE_ALLOWED_ORIGINS=https://a,https://b; other
# BACKPLANE_* variables (a Kubernetes Service's) are ignored with a warning.
BACKPLANE: dict[str, object] = from_environment(os.environ)

# --- The rest ---------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# The image runs collectstatic into it; without that, WhiteNoise finds the apps' files itself.
STATIC_ROOT = BASE_DIR / "var" / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True

# Plain text, or one JSON object per line with LOG_FORMAT=json (backplane/logs.py).
LOGGING = logging_config(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("DAPHNE_LOG_LEVEL", "WARNING"))
