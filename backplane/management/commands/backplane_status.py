import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from backplane.status import snapshot


class Command(BaseCommand):
    help = "Show the backplane's state: outbox backlog and lag, shard leases, edges, connections, streams."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        snap = snapshot()
        if options["json"]:
            self.stdout.write(json.dumps(snap, sort_keys=True))
            return
        box = snap["outbox"]
        self.stdout.write(
            f"outbox: {box['rows']} rows, {box['unassigned']} unassigned, {box['unforwarded']} "
            f"unforwarded, oldest pending {box['oldest_pending_age_secs']}s"
        )
        held = [lease for lease in snap["leases"] if lease["live"]]
        self.stdout.write(f"shards: {len(held)} leased of {len(snap['leases'])} known")
        for lease in held:
            self.stdout.write(
                f"  shard {lease['shard']:>3}  {lease['holder']}  beat {lease['heartbeat_age_secs']}s ago"
                f"  forwarded {lease['forwarded_total']}"
            )
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
