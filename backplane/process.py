"""Process-wide tuning of the backplane's long-running processes (edges, relays, ``serve``)."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect garbage once, then take every object alive now — modules, settings, code:
    hundreds of thousands after Django has started — out of the cyclic collector's view.

    A full collection then walks only what the process made since, so it does not stall
    forwarding (docs/decisions/0016-gc-freeze-at-start-up.md).
    """
    gc.collect()
    gc.freeze()
