"""channels behaviour the edge relies on beyond its documented API."""

from __future__ import annotations

# A consumer whose ``channel_layer_alias`` names no configured layer gets no layer and no
# channel of its own (``get_channel_layer`` answers None for an unknown alias): the edge
# runtime's one subscription per stream hands batches to its sockets instead.
NO_LAYER_ALIAS = "tyrum.edge-runtime"

# channels' dispatch turns a message type into a handler name with this.
from channels.consumer import get_handler_name  # noqa: E402

__all__ = ["NO_LAYER_ALIAS", "get_handler_name"]
