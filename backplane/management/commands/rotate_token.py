import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backplane import exceptions, tokens
from backplane.conf import conf
from backplane.management.commands import _lifetime as lifetime


class Command(BaseCommand):
    help = (
        "Issue a new token for the same tenant, device, role and label as a token given by its id, "
        "or by the token itself on standard input ('-'). The old token stays valid for the grace "
        "period, never longer than it already was. Prints the new token alone on its last line."
    )
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("token_id", help="the old token's id, or '-' to read the old token from standard input")
        parser.add_argument(
            "--grace",
            type=lifetime.seconds,
            default=None,
            metavar="SECONDS",
            help=f"how long the old token stays valid (default: {conf.TOKEN_ROTATION_GRACE_SECS:g})",
        )
        lifetime.add_arguments(parser, "the new token's")

    def handle(self, *args: Any, **options: Any) -> None:
        expires = lifetime.expires_at(options)
        try:
            ref = tokens.token_argument(options["token_id"], options.get("stdin") or sys.stdin)
            old, new, token = tokens.rotate_token(ref, grace_secs=options["grace"], expires_at=expires, actor="cli")
        except exceptions.BackplaneError as exc:
            raise CommandError(str(exc)) from None
        assert old.expires_at is not None  # rotation always bounds the old token
        self.stdout.write(f"token {old.id} stays valid until {old.expires_at:%Y-%m-%d %H:%M:%S}Z")
        until = f"expires {new.expires_at:%Y-%m-%d %H:%M:%S}Z" if new.expires_at else "never expires"
        self.stdout.write(f"new token id {new.id} for {new.device_id} ({new.role}), {until}")
        self.stdout.write(token)
