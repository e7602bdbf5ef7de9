"""Secret handles: a reference to a secret that travels in a payload instead of its value.

A producer that must tell peers which secret to use puts a handle in the payload, not the
secret::

    publish(tenant, "integration.configured", {"api_key": SecretRef("vault://kv/payments#api_key")})

It is stored and delivered as the JSON object ``{"$secret_ref": "vault://kv/payments#api_key"}``:
exactly one key, ``$secret_ref``, whose value is a URI (``scheme://rest``, no whitespace, no
``user:password@``). Redaction leaves a handle alone even under a secret-looking key, and the
backplane never resolves one: the peer that receives it asks its own secret store, with its own
credentials. Pure: no Django, so peers can import it (``SecretRef.from_json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# The one key of a handle's JSON form; "$" keeps it out of the way of producers' own keys.
REF_KEY = "$secret_ref"
# Longest handle accepted: a path into a secret store, not a document.
MAX_REF_CHARS = 512
# scheme://rest, URI characters only; an authority with "@" (user:password@host) is refused.
_REF = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?![^/?#]*@)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


def is_ref(uri: object) -> bool:
    """Whether ``uri`` is a well-formed handle: a string, ``scheme://rest``, no credentials in it."""
    return isinstance(uri, str) and len(uri) <= MAX_REF_CHARS and _REF.fullmatch(uri) is not None


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A reference to a secret (``vault://kv/payments#api_key``), never the secret itself.

    Raises ``ValueError`` for anything that is not a well-formed handle; the message does not
    repeat the value, which may be the very secret a handle should have replaced.
    """

    uri: str

    def __post_init__(self) -> None:
        if not is_ref(self.uri):
            raise ValueError(
                f"a secret handle is a URI like 'vault://kv/app#key' (scheme://path, at most "
                f"{MAX_REF_CHARS} characters, no whitespace, no user:password@)"
            )

    def as_json(self) -> dict[str, str]:
        """The handle's JSON form, as stored and delivered."""
        return {REF_KEY: self.uri}

    @classmethod
    def from_json(cls, value: Any) -> SecretRef | None:
        """The handle ``value`` is in JSON form, or None if it is not one (for peers)."""
        if is_handle(value) and isinstance(value, dict):
            return cls(value[REF_KEY])
        return None


def is_handle(value: Any) -> bool:
    """Whether ``value`` is a handle: a ``SecretRef``, or exactly ``{"$secret_ref": <handle URI>}``."""
    if isinstance(value, SecretRef):
        return True
    return isinstance(value, dict) and len(value) == 1 and is_ref(value.get(REF_KEY))


def json_default(value: Any) -> Any:
    """``json`` encoder hook: a ``SecretRef`` in a payload is encoded as its JSON form."""
    if isinstance(value, SecretRef):
        return value.as_json()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
