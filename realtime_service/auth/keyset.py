"""A JSON Web Key Set file whose keys are chosen by `kid` (PROTOCOL 2, key rotation).

The main API rotates keys by publishing a new set: the file is read again when it changes (its inode, size and
mtime are looked at, at most once per `check_every` seconds, from the verification path itself, so no task is
needed) and on demand (SIGHUP). A file that cannot be used keeps the keys in force and is logged once per change;
the keys are parsed by PyJWT (`PyJWK`), never by hand, and each key is bound to one algorithm by PyJWT, so a key
of one family is never used with an algorithm of another (algorithm confusion).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

log = logging.getLogger("realtime.tokens")

MAX_FILE_BYTES = 1024 * 1024
CHECK_EVERY = 1.0

Signature = tuple[int, int, int]  # (inode, size, mtime in ns): changes when the file is replaced or rewritten


class KeySetError(ValueError):
    """The file cannot be used as a key set; the message says why (never any key material)."""


def _signature(path: Path) -> Signature | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def parse_key_set(data: bytes) -> tuple[dict[str, jwt.PyJWK], str]:
    """kid -> key for the signing keys of a JWKS document, and a fingerprint of them; KeySetError if none is usable."""
    if len(data) > MAX_FILE_BYTES:
        raise KeySetError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        document: Any = json.loads(data)
    except ValueError as exc:
        raise KeySetError(f"not JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeySetError('not a JSON Web Key Set (an object with a "keys" list)')
    # Encryption keys are not for verifying signatures; keys without a kid can never be chosen.
    members = [k for k in document["keys"]
               if isinstance(k, dict) and k.get("use") in (None, "sig") and isinstance(k.get("kid"), str)]
    if not members:
        raise KeySetError("no signing key with a kid")
    try:
        key_set = jwt.PyJWKSet(members)  # skips keys PyJWT cannot use
    except jwt.PyJWTError as exc:
        raise KeySetError(str(exc)) from None
    keys: dict[str, jwt.PyJWK] = {}
    for key in key_set.keys:
        if key.key_id is not None:
            keys.setdefault(key.key_id, key)
    return keys, json.dumps(members, sort_keys=True)


class JwksFile:
    """The keys in force from one JWKS file."""

    def __init__(self, path: Path, check_every: float = CHECK_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Read the file now; a file that cannot be used at start-up is a configuration error (KeySetError)."""
        self._path = path
        self._check_every = check_every
        self._clock = clock
        self._seen = _signature(path)
        try:
            self._keys, self._fingerprint = parse_key_set(path.read_bytes())
        except OSError as exc:
            raise KeySetError(f"cannot read REALTIME_JWT_JWKS_FILE {path}: {exc.strerror}") from None
        except KeySetError as exc:
            raise KeySetError(f"REALTIME_JWT_JWKS_FILE {path}: {exc}") from None
        self._checked = clock()
        log.info("JWKS %s: %d key(s) in force (kid %s)", path, len(self._keys), ", ".join(sorted(self._keys)))

    def key(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def maybe_reload(self) -> bool:
        """Cheap: look at the file at most once per `check_every`; read it again if it changed. True if keys changed."""
        now = self._clock()
        if now - self._checked < self._check_every:
            return False
        self._checked = now
        if _signature(self._path) == self._seen:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Read the file now (SIGHUP or a change); keep the keys in force if it cannot be used. True if keys changed."""
        self._checked = self._clock()
        self._seen = _signature(self._path)  # before reading: a write racing the read is seen on the next check
        try:
            keys, fingerprint = parse_key_set(self._path.read_bytes())
        except (OSError, KeySetError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.error("JWKS %s could not be used (%s); keeping the %d key(s) in force", self._path, reason,
                      len(self._keys))
            return False
        if fingerprint == self._fingerprint:
            return False
        log.info("JWKS %s reloaded: %d key(s) in force (kid %s)", self._path, len(keys), ", ".join(sorted(keys)))
        self._keys, self._fingerprint = keys, fingerprint
        return True
