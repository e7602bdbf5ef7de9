"""Tyrum backplane: durable outbox, relay and edges for a WebSocket gateway.

Producers call ``publish``/``publish_many`` inside their own transactions::

    from backplane import publish
    with transaction.atomic():
        run.save()
        publish(tenant, "run.updated", {"run_id": run.id}, device="node-7")

A secret travels as a handle, never as its value: ``SecretRef("vault://kv/payments#api_key")``.
"""

from typing import Any

__all__ = ["publish", "publish_many", "presence", "SecretRef"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package does not import models before apps are ready.
    if name in ("publish", "publish_many"):
        from backplane import outbox

        return getattr(outbox, name)
    if name == "presence":
        from backplane import directory

        return directory.presence
    if name == "SecretRef":
        from backplane.secrets import SecretRef

        return SecretRef
    raise AttributeError(name)
