from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backplane import auth, exceptions


class Command(BaseCommand):
    help = (
        "Revoke a token (given as the token or its id). Its live sockets close with 4008 on whichever edge holds them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("token_or_id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            row, edges = auth.revoke_token(options["token_or_id"])
        except exceptions.BackplaneError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"revoked token {row.id}; told {len(edges)} edge(s)")
