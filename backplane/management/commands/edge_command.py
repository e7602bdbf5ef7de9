from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backplane import commands, exceptions
from backplane.models import Edge, Tenant


class Command(BaseCommand):
    help = (
        "Send a directed command through the outbox: 'disconnect' a device's sockets (4008), 'resync' "
        "(4409: peers refetch), 'resume' (4001: peers reconnect and resume) for a tenant or one device, "
        "or 'drain' an edge (4001 to all its sockets; it refuses new ones). Prints the edges told."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("command", choices=["disconnect", "resync", "resume", "drain"])
        parser.add_argument("--tenant", help="tenant slug or id (all but drain)")
        parser.add_argument("--device", help="device id (required for disconnect)")
        parser.add_argument("--edge", help="edge id (drain)")

    def handle(self, *args: Any, **options: Any) -> None:
        command = options["command"]
        try:
            if command == "drain":
                if not options["edge"]:
                    raise CommandError("drain needs --edge")
                commands.drain_edge(options["edge"])
                edges = [options["edge"]]
            else:
                if not options["tenant"]:
                    raise CommandError(f"{command} needs --tenant")
                if command == "disconnect":
                    if not options["device"]:
                        raise CommandError("disconnect needs --device")
                    edges = commands.disconnect_device(options["tenant"], options["device"])
                elif command == "resync":
                    edges = commands.resync(options["tenant"], options["device"])
                else:
                    edges = commands.make_resume(options["tenant"], options["device"])
        except (exceptions.BackplaneError, Edge.DoesNotExist, Tenant.DoesNotExist) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{command}: told {len(edges)} edge(s)")
        self.stdout.write(",".join(edges))
