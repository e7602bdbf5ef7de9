from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from backplane import exceptions, tokens
from backplane.conf import conf
from backplane.outbox import resolve_tenant
from backplane.streams import ROLES


def positive_seconds(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


class Command(BaseCommand):
    help = (
        "Create an access token for one device and role of a tenant. It expires after "
        "BACKPLANE['TOKEN_LIFETIME_SECS'] unless --expires-in or --no-expiry says otherwise. "
        "Prints the token alone on its last line; it is shown once and stored only as a hash."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="tenant slug or id")
        parser.add_argument("--device", required=True, help="device id")
        parser.add_argument("--role", required=True, choices=ROLES)
        parser.add_argument("--label", default="")
        lifetime = parser.add_mutually_exclusive_group()
        lifetime.add_argument(
            "--expires-in",
            type=positive_seconds,
            default=None,
            metavar="SECONDS",
            help=f"token lifetime in seconds (default: {conf.TOKEN_LIFETIME_SECS:g})",
        )
        lifetime.add_argument("--no-expiry", action="store_true", help="a token that never expires (revoke it)")

    def handle(self, *args: Any, **options: Any) -> None:
        expires: Any = tokens.Lifetime.DEFAULT
        if options["no_expiry"]:
            expires = None
        elif options["expires_in"]:
            expires = timezone.now() + timedelta(seconds=options["expires_in"])
        try:
            tenant = resolve_tenant(options["tenant"])
            row, token = tokens.create_token(
                tenant, options["device"], options["role"], label=options["label"], expires_at=expires, actor="cli"
            )
        except exceptions.BackplaneError as exc:
            raise CommandError(str(exc)) from None
        until = f"expires {row.expires_at:%Y-%m-%d %H:%M:%S}Z" if row.expires_at else "never expires"
        self.stdout.write(f"token id {row.id} for {tenant.slug}/{row.device_id} ({row.role}), {until}")
        self.stdout.write(token)
