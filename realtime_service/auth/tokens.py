"""Token verification (PROTOCOL 2): a JWT in, a Principal out, or InvalidToken / TokenExpired.

Messages never include the token: they go into close reasons, logs and HTTP answers.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson

from realtime_service.errors import InvalidToken, TokenExpired

PUBLISH_SCOPE = "realtime:publish"
VERIFIED_CACHE_SIZE = 4096
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


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
        return sub if sub > 0 else None
    if isinstance(sub, str) and sub.isascii() and sub.isdigit():
        value = int(sub)
        return value if value > 0 else None
    return None


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
                 audience: str | None, issuer: str | None, leeway: float) -> None:
        self._algorithms = list(algorithms)
        self._secret = secret
        self._public_key = _load_public_key(public_key_file) if public_key_file is not None else None
        self._verified: dict[str, Principal] = {}
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        if any(a in HMAC_ALGORITHMS for a in algorithms) and not secret:
            raise ValueError("an HMAC algorithm is allowed but REALTIME_JWT_SECRET is not set")
        if any(a not in HMAC_ALGORITHMS for a in algorithms) and not self._public_key:
            raise ValueError("a public-key algorithm is allowed but REALTIME_JWT_PUBLIC_KEY_FILE is not set")

    def verify(self, token: str) -> Principal:
        """Verify a token; raise InvalidToken or TokenExpired with a message that never quotes it.

        Tokens that verified are remembered until they expire: the main API sends the same service token with
        every publish, and a reconnect storm repeats the same user tokens, so most checks are a dict lookup.
        Only successes are cached, keyed by the whole token (signature included); expiry is checked each time.
        """
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
        key = self._secret if alg in HMAC_ALGORITHMS else self._public_key
        if key is None:
            raise InvalidToken("token algorithm not allowed")
        options: Any = {"require": ["exp"], "verify_sub": False, "verify_jti": False,
                                   "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer,
                                leeway=self._leeway, options=options)
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks the {exc.claim!r} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise InvalidToken("token audience or issuer not accepted" if exc else "") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad token signature") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("invalid token") from None
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise InvalidToken("token exp is not a number")
        sub = claims.get("sub")
        is_service = PUBLISH_SCOPE in _scopes(claims.get("scope"))
        user_id = None if is_service else _user_id(sub)
        if is_service:
            if not isinstance(sub, str | int) or isinstance(sub, bool) or str(sub) == "":
                raise InvalidToken("service token lacks a sub")
        elif user_id is None:
            raise InvalidToken("user token sub is not a user id")
        return Principal(sub=str(sub), user_id=user_id, is_service=is_service, expires_at=float(exp))

    @property
    def leeway(self) -> float:
        return self._leeway
