from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backplane import retention


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise CommandError(f"bad duration {text!r}: use e.g. 90s, 30m, 24h, 7d") from None


class Command(BaseCommand):
    help = "Delete forwarded outbox rows older than the retention window (never unforwarded rows)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--retention", default=None, help="window, e.g. 24h (default: BACKPLANE RETENTION_SECS)")
        parser.add_argument("--dry-run", action="store_true", help="count what would be removed")

    def handle(self, *args: Any, **options: Any) -> None:
        secs = parse_duration(options["retention"]) if options["retention"] else None
        result = retention.compact(secs, dry_run=options["dry_run"])
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(
            f"{verb} {result.deleted} rows; {result.unforwarded_expired} expired rows not forwarded yet (kept)"
        )
