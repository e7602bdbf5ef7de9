from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError
from django.utils.text import slugify

from backplane.models import Tenant


class Command(BaseCommand):
    help = "Create a tenant. The slug defaults to slugify(NAME). Prints the tenant id alone on its last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--slug", help="URL-safe short name (default: slugify(NAME))")

    def handle(self, *args: Any, **options: Any) -> None:
        slug = options["slug"] or slugify(options["name"])
        if not slug:
            raise CommandError("the slug is empty: give --slug")
        try:
            tenant = Tenant.objects.create(name=options["name"], slug=slug)
        except IntegrityError:
            raise CommandError(f"a tenant with slug {slug!r} exists already") from None
        self.stdout.write(f"created tenant {tenant.slug}")
        self.stdout.write(str(tenant.id))
