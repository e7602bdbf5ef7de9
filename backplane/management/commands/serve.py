"""``manage.py serve``: the single-node gateway (edge + relay + compaction in one process)."""

import asyncio
import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

logger = logging.getLogger("backplane.serve")


class Command(BaseCommand):
    help = (
        "Serve the gateway on one machine: a daphne edge, a relay and periodic compaction in one "
        "process. With DATABASE_URL/REDIS_URL unset it uses SQLite and the in-process channel layer."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args: Any, **options: Any) -> None:
        from channels.layers import get_channel_layer
        from channels.routing import get_default_application
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server
        from twisted.internet import reactor

        from backplane import logs, relay, retention
        from backplane.conf import conf

        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        async def compaction_loop() -> None:
            from channels.db import database_sync_to_async

            while True:
                await asyncio.sleep(conf.COMPACT_INTERVAL_SECS)
                try:
                    result = await database_sync_to_async(retention.compact)()
                    logger.info("compacted %d rows", result.deleted, extra={"action": "compact"})
                except Exception as exc:
                    logger.warning("compaction failed: %s", type(exc).__name__, extra={"action": "compact_error"})

        def start_background() -> None:
            # Other processes (publish_event) cannot ring an in-process doorbell: poll often.
            poll = min(conf.RELAY_POLL_INTERVAL_SECS, 0.25) if conf.embedded_layer else conf.RELAY_POLL_INTERVAL_SECS
            worker = relay.Relay(get_channel_layer(), poll_interval=poll)
            tasks.append(asyncio.ensure_future(worker.run(stop)))
            tasks.append(asyncio.ensure_future(compaction_loop()))

        def stop_background() -> None:
            stop.set()
            for task in tasks[1:]:
                task.cancel()

        reactor.callWhenRunning(start_background)
        # twisted's interfaces declare their methods without self: mypy reads the arguments one off.
        reactor.addSystemEventTrigger("before", "shutdown", stop_background)  # type: ignore[arg-type]
        text = (
            f"Tyrum gateway on ws://{options['host']}:{options['port']}/ws "
            f"(embedded: {conf.embedded_layer}); Ctrl-C stops it."
        )
        logs.report(self.stdout, text, "serve_start", logger)
        self.stdout.flush()
        Server(
            application=get_default_application(),  # the project's ASGI_APPLICATION
            endpoints=build_endpoint_description_strings(host=options["host"], port=options["port"]),
            signal_handlers=True,
            action_logger=None,
        ).run()
