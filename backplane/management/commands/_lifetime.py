"""A new token's lifetime on the command line (``create_token``, ``rotate_token``): the
options and what they ask ``tokens`` for. (A leading underscore: Django lists no command here.)"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from backplane import tokens
from backplane.conf import conf


def seconds(text: str) -> int:
    """A number of seconds, zero or more."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def positive_seconds(text: str) -> int:
    """A number of seconds, more than zero."""
    value = seconds(text)
    if value == 0:
        raise ValueError(text)
    return value


def add_arguments(parser: CommandParser, whose: str) -> None:
    """``--expires-in SECONDS`` or ``--no-expiry`` for ``whose`` lifetime."""
    lifetime = parser.add_mutually_exclusive_group()
    lifetime.add_argument(
        "--expires-in",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help=f"{whose} lifetime in seconds (default: {conf.TOKEN_LIFETIME_SECS:g})",
    )
    lifetime.add_argument("--no-expiry", action="store_true", help=f"{whose} never expires (revoke it)")


def expires_at(options: dict[str, Any]) -> Any:
    """The ``expires_at`` those options ask for: the default lifetime, none, or a time."""
    if options["no_expiry"]:
        return None
    if options["expires_in"]:
        return timezone.now() + timedelta(seconds=options["expires_in"])
    return tokens.Lifetime.DEFAULT
