import contextlib
import logging
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from backplane import logs, metrics, retention

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Parse ``90s``, ``30m``, ``24h``, ``7d`` (or plain seconds) into seconds."""
    try:
        value = float(text[:-1]) * UNITS[text[-1]] if text and text[-1] in UNITS else float(text)
    except (ValueError, IndexError):
        raise CommandError(f"bad duration {text!r}: use e.g. 90s, 30m, 24h, 7d") from None
    if value <= 0:
        raise CommandError("--retention must be positive")
    return value


class Command(BaseCommand):
    help = (
        "Apply the outbox retention rules once: drop/delete forwarded rows past the retention window "
        "and beyond the row and byte budgets, oldest first, in bounded batches, under a lock (one "
        "compactor at a time). Rows not forwarded yet are never removed: they are counted and reported."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--retention", default=None, help="window, e.g. 90s, 30m, 24h, 7d (default: settings)")
        parser.add_argument("--max-rows", type=int, default=None, help="row budget (default: settings; none)")
        parser.add_argument("--max-bytes", type=int, default=None, help="payload byte budget (default: settings)")
        parser.add_argument("--batch-size", type=int, default=None, help="rows per delete transaction")
        parser.add_argument("--max-batches", type=int, default=2000, help="per-run cap on delete batches")
        parser.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
        parser.add_argument(
            "--metrics-file",
            default=None,
            help="write the compaction metrics here (node_exporter's textfile collector), atomically",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        secs = parse_duration(options["retention"]) if options["retention"] else None
        for key in ("max_rows", "max_bytes", "batch_size", "max_batches"):
            if options[key] is not None and options[key] <= 0:
                raise CommandError(f"--{key.replace('_', '-')} must be positive")
        tty = sys.stderr.isatty()
        line = logs.ProgressLine(sys.stderr)
        try:
            with line if tty else contextlib.nullcontext():
                result = retention.compact(
                    secs,
                    max_rows=options["max_rows"],
                    max_bytes=options["max_bytes"],
                    batch_size=options["batch_size"],
                    max_batches=options["max_batches"],
                    dry_run=options["dry_run"],
                    progress=line.update if tty else None,
                )
        except DatabaseError as exc:
            raise CommandError(f"compaction failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        if options["metrics_file"]:
            metrics.write_textfile(options["metrics_file"])
        logs.report(self.stdout, result.summary(), "compact_summary", logging.getLogger("backplane.retention"))
