from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from backplane import auth, exceptions
from backplane.outbox import resolve_tenant
from backplane.streams import ROLES


class Command(BaseCommand):
    help = (
        "Create an access token for one device and role of a tenant. "
        "Prints the token alone on its last line; it is shown once and stored only as a hash."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="tenant slug or id")
        parser.add_argument("--device", required=True, help="device id")
        parser.add_argument("--role", required=True, choices=ROLES)
        parser.add_argument("--label", default="")
        parser.add_argument(
            "--expires-in",
            type=int,
            default=None,
            metavar="SECONDS",
            help="token lifetime in seconds (default: no expiry)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            tenant = resolve_tenant(options["tenant"])
            expires = (timezone.now() + timedelta(seconds=options["expires_in"])) if options["expires_in"] else None
            row, token = auth.create_token(
                tenant, options["device"], options["role"], label=options["label"], expires_at=expires
            )
        except exceptions.BackplaneError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"token id {row.id} for {tenant.slug}/{row.device_id} ({row.role})")
        self.stdout.write(token)
