"""Run an edge: daphne on uvloop (``BACKPLANE_EVENT_LOOP``, ``backplane.process``).

    python -m backplane.run_edge -b 0.0.0.0 -p 8000 tyrum.asgi:application

takes daphne's own arguments. daphne makes twisted's asyncio loop when its server module is
imported, so the loop's policy is set first, here; plain ``daphne`` still works, on asyncio's
loop (docs/decisions/0031-speed-libraries.md).
"""

from __future__ import annotations


def main() -> None:
    from backplane.process import install_event_loop_policy

    install_event_loop_policy()
    from daphne.cli import CommandLineInterface

    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
