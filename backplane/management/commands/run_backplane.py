import logging
from typing import Any

from channels.layers import get_channel_layer
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from backplane import logs, process, relay, streams
from backplane.asgi import refuse_unsafe_start
from backplane.conf import conf
from backplane.process import freeze_startup_objects


class Command(BaseCommand):
    help = (
        "Run a relay worker: assign stream offsets to committed outbox rows and forward them "
        "to the edges through the channel layer. Several may run; each shard has one active relay."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--shards", default="", help="shards this relay may take, e.g. '0-7,9' (default: all)")
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument(
            "--poll-interval", type=float, default=None, help="seconds between polls without a doorbell"
        )
        parser.add_argument("--once", action="store_true", help="forward what is waiting, then exit")
        parser.add_argument(
            "--http-port", type=int, default=None, help="answer /metrics, /livez and /readyz on this port"
        )
        parser.add_argument("--http-host", default="0.0.0.0", help="address of the HTTP port (default: all)")  # noqa: S104

    def handle(self, *args: Any, **options: Any) -> None:
        if conf.embedded_layer:
            raise CommandError(
                "REDIS_URL is unset: the in-process channel layer reaches no edge. "
                "Set REDIS_URL, or use 'manage.py serve' for the embedded mode."
            )
        try:
            refuse_unsafe_start("a relay")
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        try:
            shards = streams.parse_shards(options["shards"], conf.SHARDS)
        except ValueError as exc:
            raise CommandError(f"--shards: {exc}") from None
        freeze_startup_objects()
        done = process.run(  # on uvloop unless BACKPLANE_EVENT_LOOP=asyncio
            relay.run_until_signal(
                get_channel_layer(),
                shards=shards,
                batch_size=options["batch_size"],
                poll_interval=options["poll_interval"],
                once=options["once"],
                http_port=options["http_port"],
                http_host=options["http_host"],
            )
        )
        text = f"forwarded {done.forwarded_total} (assigned {done.assigned_total})"
        logs.report(self.stdout, text, "relay_summary", logging.getLogger("backplane.relay"))
