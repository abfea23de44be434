"""Token verification (PROTOCOL 2): a JWT in, a Principal out, or InvalidToken / TokenExpired.

Messages never include the token: they go into close reasons, logs and HTTP answers.

Keys: HMAC tokens verify against REALTIME_JWT_SECRET, then REALTIME_JWT_PREVIOUS_SECRET (rotation without a flag
day); public-key tokens against REALTIME_JWT_PUBLIC_KEY_FILE; a token with a `kid`, when REALTIME_JWT_JWKS_FILE is
set, only against the key of that `kid` in the set. An HMAC algorithm is only ever given a secret and a
public-key algorithm only a public key (algorithm confusion).
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson

from realtime_service.auth.keyset import JwksFile, KeySetError
from realtime_service.errors import InvalidToken, TokenExpired

PUBLISH_SCOPE = "realtime:publish"
VERIFIED_CACHE_SIZE = 4096
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
MAX_USER_ID = 2**63 - 1  # user ids are Postgres bigints
MAX_SUB_LENGTH = 256  # a service's name; anything longer is not one, and it would reach logs and metrics
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z: exp/nbf/iat beyond it are not times


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: a user (with an integer id) or a service (scope realtime:publish)."""

    sub: str
    user_id: int | None
    is_service: bool
    expires_at: float

    def same_subject(self, other: Principal) -> bool:
        return self.sub == other.sub and self.is_service == other.is_service


def _scopes(claim: Any) -> set[str]:
    if isinstance(claim, str):
        return set(claim.split())
    if isinstance(claim, list | tuple):
        return {s for s in claim if isinstance(s, str)}
    return set()


def _user_id(sub: Any) -> int | None:
    if isinstance(sub, int) and not isinstance(sub, bool):
        return sub if 0 < sub <= MAX_USER_ID else None
    # Bound the digits before int(): Python refuses strings over 4,300 digits (ValueError), and 19 are enough.
    if isinstance(sub, str) and sub.isascii() and sub.isdigit() and len(sub) <= len(str(MAX_USER_ID)):
        value = int(sub)
        return value if 0 < value <= MAX_USER_ID else None
    return None


def _service_name(sub: Any) -> str | None:
    if isinstance(sub, str):
        return sub if 0 < len(sub) <= MAX_SUB_LENGTH else None
    if isinstance(sub, int) and not isinstance(sub, bool) and 0 < sub <= MAX_USER_ID:
        return str(sub)
    return None


def _timestamp(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim, or None when absent. Booleans, NaN, infinities and absurd values are refused.

    PyJWT would read `true` as 1 (so `exp: true` looked expired) and float(10**400) overflows; checking the type and
    range here keeps every malformed time an `invalid_token`.
    """
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"token {name} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidToken(f"token {name} is not a number")
    if not 0 <= value <= MAX_TIMESTAMP:
        raise InvalidToken(f"token {name} is out of range")
    return float(value)


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, parsed once (PyJWT would parse it again for `get_unverified_header`)."""
    head, dot, _rest = token.partition(".")
    if not dot or not head:
        raise InvalidToken("malformed token")
    try:
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise InvalidToken("malformed token") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed token")
    return header


def _load_public_key(path: Path) -> Any:
    """Parse the PEM once at start-up; PyJWT would parse a PEM string on every verification."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"REALTIME_JWT_PUBLIC_KEY_FILE is not a PEM public key: {exc}") from None


class TokenVerifier:
    """Checks signature against the configured allow-list, then exp/nbf/iat, and aud/iss when configured."""

    def __init__(self, algorithms: tuple[str, ...], secret: str | None, public_key_file: Path | None,
                 audience: str | None, issuer: str | None, leeway: float, *, previous_secret: str | None = None,
                 jwks_file: Path | None = None) -> None:
        self._algorithms = list(algorithms)
        self._secrets = tuple(s for s in (secret, previous_secret) if s)
        self._public_key = _load_public_key(public_key_file) if public_key_file is not None else None
        try:
            self._jwks = JwksFile(jwks_file) if jwks_file is not None else None
        except KeySetError as exc:
            raise ValueError(str(exc)) from None
        self._verified: dict[str, Principal] = {}
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        if previous_secret and not secret:
            raise ValueError("REALTIME_JWT_PREVIOUS_SECRET is set without REALTIME_JWT_SECRET")
        if any(a in HMAC_ALGORITHMS for a in algorithms) and not secret and self._jwks is None:
            raise ValueError("an HMAC algorithm is allowed but neither REALTIME_JWT_SECRET nor "
                             "REALTIME_JWT_JWKS_FILE is set")
        if any(a not in HMAC_ALGORITHMS for a in algorithms) and not self._public_key and self._jwks is None:
            raise ValueError("a public-key algorithm is allowed but neither REALTIME_JWT_PUBLIC_KEY_FILE nor "
                             "REALTIME_JWT_JWKS_FILE is set")

    def reload_keys(self) -> None:
        """Read the JWKS file again now (SIGHUP). Open connections are not touched; a broken file keeps the keys."""
        if self._jwks is not None and self._jwks.reload():
            self._verified.clear()

    def verify(self, token: str) -> Principal:
        """Verify a token; raise InvalidToken or TokenExpired with a message that never quotes it.

        Tokens that verified are remembered until they expire: the main API sends the same service token with
        every publish, and a reconnect storm repeats the same user tokens, so most checks are a dict lookup.
        Only successes are cached, keyed by the whole token (signature included); expiry is checked each time.
        When the key set changes the cache is emptied, so a token signed by a key taken out of the set is refused
        from its next use on (within a second of the file change, or at once on SIGHUP).
        """
        if self._jwks is not None and self._jwks.maybe_reload():
            self._verified.clear()
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at + self._leeway >= time.time():
                return known
            del self._verified[token]
            raise TokenExpired("token expired")
        principal = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("token algorithm not allowed")
        claims = self._decode(token, alg, self._keys_for(header, alg))
        exp = _timestamp(claims, "exp")
        assert exp is not None  # required by _decode
        not_before = max((t for t in (_timestamp(claims, "nbf"), _timestamp(claims, "iat")) if t is not None),
                         default=None)
        now = time.time()
        if not_before is not None and not_before > now + self._leeway:
            raise InvalidToken("token not yet valid")
        if exp <= now - self._leeway:
            raise TokenExpired("token expired")
        sub = claims.get("sub")
        is_service = PUBLISH_SCOPE in _scopes(claims.get("scope"))
        if is_service:
            name = _service_name(sub)
            if name is None:
                raise InvalidToken("service token lacks a sub")
            return Principal(sub=name, user_id=None, is_service=True, expires_at=exp)
        user_id = _user_id(sub)
        if user_id is None:
            raise InvalidToken("user token sub is not a user id")
        return Principal(sub=str(sub), user_id=user_id, is_service=False, expires_at=exp)

    def _keys_for(self, header: dict[str, Any], alg: str) -> list[Any]:
        """The keys a token may be signed with: never a secret for a public-key algorithm, nor the reverse."""
        kid = header.get("kid")
        if self._jwks is not None and kid is not None:
            if not isinstance(kid, str):
                raise InvalidToken("token kid is not a string")
            key = self._jwks.key(kid)
            if key is None:
                raise InvalidToken("token kid is not in the key set")
            if key.algorithm_name != alg:  # PyJWT refuses this too; say so plainly
                raise InvalidToken("token algorithm not allowed for its key")
            return [key]
        keys: list[Any] = list(self._secrets) if alg in HMAC_ALGORITHMS else [self._public_key]
        keys = [k for k in keys if k is not None]
        if not keys:
            raise InvalidToken("token algorithm not allowed")
        return keys

    def _decode(self, token: str, alg: str, keys: list[Any]) -> dict[str, Any]:
        """The claims, once the signature (each key in turn) and aud/iss hold; the caller checks the times."""
        options: Any = {"require": ["exp"], "verify_sub": False, "verify_jti": False, "verify_exp": False,
                        "verify_nbf": False, "verify_iat": False, "verify_aud": self._audience is not None}
        for index, key in enumerate(keys):
            try:
                claims: dict[str, Any] = jwt.decode(token, key, algorithms=[alg], audience=self._audience,
                                                    issuer=self._issuer, leeway=self._leeway, options=options)
                return claims
            except jwt.InvalidSignatureError:
                if index == len(keys) - 1:
                    raise InvalidToken("bad token signature") from None
            except jwt.MissingRequiredClaimError as exc:
                raise InvalidToken(f"token lacks the {exc.claim!r} claim") from None
            except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
                raise InvalidToken("token audience or issuer not accepted") from None
            except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
                raise InvalidToken("invalid token") from None
        raise InvalidToken("bad token signature")

    @property
    def leeway(self) -> float:
        return self._leeway
