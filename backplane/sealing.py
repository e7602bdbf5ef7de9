"""Sealed messages: AES-256-GCM over raw bytes, for every message the backplane puts on Redis
(docs/decisions/0029-relay-to-peer-hop.md; the properties are 0024's).

A sealed message is ``header | nonce | ciphertext and tag``, the header (authenticated, not
secret) holding a version byte, the id of the key that sealed it and the second it was sealed:

- authenticated: a message altered, or sealed with a key not listed, does not open;
- rotation: the first key seals, every listed key opens (the key id picks it);
- age: a message sealed more than ``max_age`` seconds ago, or more than ``CLOCK_SKEW_SECS``
  in the future, does not open (a recorded message cannot be replayed later).

Nonces are a random 8-byte prefix per ``Sealer`` and a 4-byte counter (a new prefix when it
wraps): never repeated under one key, unlike random 12-byte nonces past 2**32 messages.
Everything that does not open raises ``cryptography.fernet.InvalidToken``, as Fernet does.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import time
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 0x01
HEADER = struct.Struct(">B4sQ")  # version, key id, sealed at (Unix seconds)
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = HEADER.size + NONCE_BYTES + TAG_BYTES
# Clocks of relays and edges may differ this much (Fernet allows 60 s too).
CLOCK_SKEW_SECS = 60


def derive(key: str | bytes) -> tuple[bytes, bytes]:
    """(AES-256 key, 4-byte key id) of a configured key: two hashes with their own
    personalisation, so neither reveals the other nor Fernet's key of the same text."""
    raw = key.encode() if isinstance(key, str) else key
    return (
        hashlib.blake2b(raw, digest_size=32, person=b"tyrum-aead-key").digest(),
        hashlib.blake2b(raw, digest_size=4, person=b"tyrum-aead-kid").digest(),
    )


class Sealer:
    def __init__(self, keys: Sequence[str | bytes], max_age: int) -> None:
        if not keys:
            raise ValueError("a Sealer needs at least one key")
        self.max_age = max_age
        derived = [derive(k) for k in keys]
        self.cipher = AESGCM(derived[0][0])
        self.key_id = derived[0][1]
        self.openers: dict[bytes, list[AESGCM]] = {}
        for secret, kid in derived:
            self.openers.setdefault(kid, []).append(AESGCM(secret))
        self._new_prefix()

    def _new_prefix(self) -> None:
        self.prefix = os.urandom(NONCE_BYTES - 4)
        self.counter = itertools.count()

    def seal(self, data: bytes, now: float | None = None) -> bytes:
        n = next(self.counter)
        if n >= 1 << 32:
            self._new_prefix()
            n = next(self.counter)
        header = HEADER.pack(VERSION, self.key_id, int(time.time() if now is None else now))
        nonce = self.prefix + n.to_bytes(4, "big")
        return header + nonce + self.cipher.encrypt(nonce, data, header)

    def open(self, token: bytes, now: float | None = None) -> bytes:
        if len(token) < OVERHEAD or token[0] != VERSION:
            raise InvalidToken
        header = token[: HEADER.size]
        _, kid, sealed_at = HEADER.unpack(header)
        nonce = token[HEADER.size : HEADER.size + NONCE_BYTES]
        body = token[HEADER.size + NONCE_BYTES :]
        for cipher in self.openers.get(kid, ()):
            try:
                data = cipher.decrypt(nonce, body, header)
            except InvalidTag:
                continue
            # Checked once authenticated: the time in the header is the sealer's.
            current = time.time() if now is None else now
            if sealed_at + self.max_age < current or sealed_at > current + CLOCK_SKEW_SECS:
                raise InvalidToken
            return data
        raise InvalidToken


def is_sealed(token: bytes) -> bool:
    """Whether ``token`` is in this format (a Fernet token starts with ``gA``, 0x67)."""
    return token[:1] == b"\x01"
