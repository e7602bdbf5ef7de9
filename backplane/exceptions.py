"""Backplane exceptions: one root, one class per failure a caller can act on."""


class BackplaneError(Exception):
    """Raised for every failure the backplane reports; the root of all below."""


class PublishError(BackplaneError, ValueError):
    """Raised when an event cannot be published; nothing was written."""


class UnknownTenant(PublishError):
    """Raised when the tenant (object, id or slug) does not exist."""


class InactiveTenant(PublishError):
    """Raised when publishing to a tenant that is deactivated."""


class InvalidPayload(PublishError):
    """Raised when a payload is not JSON-serialisable (or holds NaN/Infinity)."""


class PayloadTooLarge(PublishError):
    """Raised when a payload's compact JSON is larger than MAX_PAYLOAD_BYTES."""


class InvalidEventType(PublishError):
    """Raised when an event type is not dotted lower-case words (``run.updated``)."""


class InvalidAudience(PublishError):
    """Raised when a device id or role is malformed, or both are given."""


class InvalidEventId(PublishError):
    """Raised when an explicit event_id is malformed."""


class TokenError(BackplaneError):
    """Raised when an access token cannot be created, found or revoked."""


class StoreUnavailable(BackplaneError):
    """Raised when the StateStore cannot be reached right now; retry later."""


class LeaseLost(BackplaneError):
    """Raised when a relay loses the session that holds its shard leases."""
