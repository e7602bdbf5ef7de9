import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backplane import exceptions, tokens


class Command(BaseCommand):
    help = (
        "Revoke a token, given by its id, or by the token itself on standard input ('-'); never "
        "undone. Its live sockets close with 4008 on whichever edge holds them."
    )
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("token_id", help="the token's id, or '-' to read the token from standard input")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            ref = tokens.token_argument(options["token_id"], options.get("stdin") or sys.stdin)
            row, edges = tokens.revoke_token(ref, actor="cli")
        except exceptions.BackplaneError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"revoked token {row.id}; told {len(edges)} edge(s)")
