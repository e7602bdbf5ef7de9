from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backplane import exceptions, tokens
from backplane.management.commands import _lifetime as lifetime
from backplane.outbox import resolve_tenant
from backplane.streams import ROLES


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
        lifetime.add_arguments(parser, "the token's")

    def handle(self, *args: Any, **options: Any) -> None:
        expires = lifetime.expires_at(options)
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
