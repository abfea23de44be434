"""AES-256-GCM envelopes for the message bodies the broker stores and relays (PROTOCOL 5.1, encryption at rest).

Diagnosis updates are health data: with REALTIME_BROKER_ENCRYPTION_KEYS set, Redis (a dump, a replica, MONITOR)
only ever sees sealed bodies. The associated data names where a body belongs (the diagnosis and offset of a
history entry, the diagnosis and user of a personal message), so an entry copied to another place fails to open.
The first key seals; every listed key opens, which is how keys rotate. This module knows keys, not Redis.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"\x01"  # envelope version
NONCE_BYTES = 12


class SealError(Exception):
    """A stored body could not be opened: unknown key, tampered, or moved to another place."""


class Sealer:
    """Seals with the first key, opens with any."""

    __slots__ = ("_keys", "_kid")

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._kid = keys[0][0].encode()
        self._keys = {kid.encode(): AESGCM(key) for kid, key in keys}

    @classmethod
    def parse(cls, setting: str) -> Sealer:
        """`kid:base64-of-32-bytes[,kid:...]`; raises ValueError naming the entry (never the key)."""
        keys: list[tuple[str, bytes]] = []
        for index, entry in enumerate(part.strip() for part in setting.split(",")):
            if not entry:
                continue
            kid, sep, encoded = entry.partition(":")
            if not sep or not kid or len(kid) > 64 or not kid.isprintable():
                raise ValueError(f"entry {index + 1} is not kid:base64-of-32-bytes")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"the key of {kid!r} is not valid base64") from None
            if len(key) != 32:
                raise ValueError(f"the key of {kid!r} is {len(key)} bytes; AES-256 needs 32")
            if any(kid == known for known, _ in keys):
                raise ValueError(f"key id {kid!r} is listed twice")
            keys.append((kid, key))
        return cls(keys)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return b"%s%c%s%s%s" % (MAGIC, len(self._kid), self._kid, nonce,
                                self._keys[self._kid].encrypt(nonce, plaintext, aad))

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 2 or sealed[:1] != MAGIC:
            raise SealError("not a sealed body")
        size = sealed[1]
        kid = sealed[2:2 + size]
        aead = self._keys.get(kid)
        if aead is None:
            raise SealError("sealed with a key that is no longer configured")
        start = 2 + size
        try:
            return aead.decrypt(sealed[start:start + NONCE_BYTES], sealed[start + NONCE_BYTES:], aad)
        except InvalidTag:
            raise SealError("the body does not open here (tampered, or moved from elsewhere)") from None


def history_aad(diagnosis_id: int, offset: int) -> bytes:
    return b"h|%d|%d" % (diagnosis_id, offset)


def personal_aad(diagnosis_id: int, user_id: int) -> bytes:
    return b"p|%d|%d" % (diagnosis_id, user_id)


def result_aad(record_key: str) -> bytes:
    return b"i|" + record_key.encode()
