import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from backplane import status


def pair(text: str) -> tuple[float, float]:
    """Parse ``WARN,CRIT`` (or one number for both)."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise CommandError(f"bad threshold {text!r}: use WARN,CRIT e.g. 30,120") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
        raise CommandError(f"bad threshold {text!r}: use WARN,CRIT with 0 <= WARN <= CRIT")
    return parts[0], parts[1]


class Command(BaseCommand):
    help = (
        "Show the backplane's state: outbox backlog and lag, shard leases, edges, connections, streams. "
        "With --check: one line per problem and exit 0 (ok), 1 (warning) or 2 (critical), for cron, "
        "Nagios or a Kubernetes probe."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--check", action="store_true", help="judge against the thresholds; exit 0/1/2")
        d = status.Thresholds()
        parser.add_argument("--max-lag", type=pair, default=d.lag_rows, help="rows waiting: WARN,CRIT")
        parser.add_argument(
            "--max-pending-age", type=pair, default=d.pending_age_secs, help="oldest pending, seconds: WARN,CRIT"
        )
        parser.add_argument(
            "--max-unleased-shards", type=pair, default=d.shards_unleased, help="shards without a live relay: WARN,CRIT"
        )
        parser.add_argument(
            "--dead-edge-after", type=float, default=d.dead_edge_secs, help="an edge silent this long is dead (s)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["check"]:
            limits = status.Thresholds(
                lag_rows=options["max_lag"],
                pending_age_secs=options["max_pending_age"],
                shards_unleased=options["max_unleased_shards"],
                dead_edge_secs=options["dead_edge_after"],
            )
            verdict = status.check(limits)
            for line in verdict.problems or ["OK: backplane healthy"]:
                self.stdout.write(line)
            self.stdout.flush()
            sys.exit(verdict.level)
        try:
            snap = status.snapshot()
        except DatabaseError as exc:
            raise CommandError(f"database unreachable ({type(exc).__name__})") from None
        if options["json"]:
            self.stdout.write(json.dumps(snap, sort_keys=True))
            return
        box = snap["outbox"]
        more = "+" if box["capped"] else ""
        self.stdout.write(
            f"outbox: ~{box['rows_estimate']} rows, {box['unassigned']}{more} unassigned, {box['unforwarded']}{more} "
            f"unforwarded, oldest pending {box['oldest_pending_age_secs']}s"
        )
        held = [lease for lease in snap["leases"] if lease["live"]]
        self.stdout.write(f"shards: {len(held)} leased of {len(snap['leases'])} known")
        for shards, lease in status.collapse_leases(snap["leases"]):
            state = f"{lease['holder']}  beat {lease['heartbeat_age_secs']}s ago" if lease["live"] else "no live relay"
            self.stdout.write(f"  shard {shards:>7}  {state}")
        self.stdout.write(f"edges: {len(snap['edges'])}")
        for edge in snap["edges"]:
            self.stdout.write(
                f"  {edge['edge_id']}  beat {edge['heartbeat_age_secs']}s ago  {edge['connections']} connections"
            )
        self.stdout.write(f"connections: {snap['connections']}")
        if snap["undeliverable_commands"]:
            self.stdout.write(f"undeliverable commands (latest {len(snap['undeliverable_commands'])}):")
            for c in snap["undeliverable_commands"]:
                self.stdout.write(f"  #{c['id']} {c['type']} → {c['edge']}: {c['reason']}")
        self.stdout.write("streams: " + ", ".join(f"{k} {v}" for k, v in sorted(snap["streams"].items())))
