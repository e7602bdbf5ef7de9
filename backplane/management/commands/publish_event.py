import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from backplane import exceptions, outbox
from backplane.streams import ROLES


class Command(BaseCommand):
    help = (
        "Publish one event to a tenant, a role (--role) or a device (--device). "
        "Prints the event id alone on its last line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="tenant slug or id")
        parser.add_argument("--type", required=True, help="event type, e.g. run.updated")
        parser.add_argument("--payload", required=True, help="JSON payload")
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--device")
        target.add_argument("--role", choices=ROLES)
        parser.add_argument("--event-id", default=None, help="stable id; publishing it again is a no-op")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            payload = json.loads(options["payload"])
        except ValueError as exc:
            raise CommandError(f"--payload is not JSON: {exc}") from None
        try:
            with transaction.atomic():
                event_id = outbox.publish(
                    options["tenant"],
                    options["type"],
                    payload,
                    device=options["device"],
                    role=options["role"],
                    event_id=options["event_id"],
                )
        except exceptions.BackplaneError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(event_id)
