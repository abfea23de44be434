"""Pure decisions of the client (PROTOCOL 3.3 and 9): what a close code means, how long to back off, when to
refresh a token. No I/O, no clock and no randomness of their own, so the tables are unit-tested as tables; the
browser module (web/static/client/realtime.js) implements the same functions with the same numbers."""

from __future__ import annotations

import base64
import binascii
import json
import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class CloseAction(StrEnum):
    STOP = "stop"  # terminal: retrying cannot help
    REFRESH = "refresh"  # get a new token, then reconnect at once
    NOW = "now"  # reconnect at once; back off if that fails too
    BACKOFF = "backoff"  # reconnect after an exponential, fully jittered delay


TERMINAL_REASONS = frozenset({"invalid_token", "forbidden", "diagnosis_not_found"})

# Codes the client uses for closes it decides itself (4000-4999 is the applications' range).
RESUME = 4000  # a gap or an epoch change seen live: reconnect and let the resume repair it
TOKEN_UNAVAILABLE = 4001  # the token callable failed or gave nothing
ABNORMAL = 1006  # no close frame: the network, a refused upgrade, a dead peer


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full jitter over min(cap, base * 2^attempt), in seconds (the browser module uses 500 ms and 20 s too)."""

    base: float = 0.5
    cap: float = 20.0


DEFAULT_BACKOFF = Backoff()
PUBLISH_BACKOFF = Backoff(base=0.2, cap=5.0)


def close_action(code: int, reason: str) -> CloseAction:
    """The table of PROTOCOL 3.3 as the client reads it."""
    if code == 1008:
        if reason in TERMINAL_REASONS:
            return CloseAction.STOP
        if reason == "token_expired":
            return CloseAction.REFRESH
        return CloseAction.BACKOFF  # auth_timeout, rate_limited, too_many_connections, newer reasons
    if code in (1012, RESUME):
        return CloseAction.NOW
    return CloseAction.BACKOFF  # 1000/1001 from the server, 1006, 1009, 1011, 1013, anything else


def backoff_ceiling(attempt: int, backoff: Backoff = DEFAULT_BACKOFF) -> float:
    """The envelope of the n-th consecutive failed attempt (0-based)."""
    return float(min(backoff.cap, backoff.base * 2 ** max(0, min(attempt, 30))))


def backoff_delay(attempt: int, backoff: Backoff = DEFAULT_BACKOFF,
                  random: Callable[[], float] = _random.random) -> float:
    """Full jitter: uniform in [0, ceiling), so clients that lost the same node spread out."""
    return random() * backoff_ceiling(attempt, backoff)


def reconnect_delay(action: CloseAction, attempt: int, backoff: Backoff = DEFAULT_BACKOFF,
                    random: Callable[[], float] = _random.random) -> float | None:
    """Seconds before the next attempt, or None to stop."""
    if action is CloseAction.STOP:
        return None
    if action in (CloseAction.NOW, CloseAction.REFRESH) and attempt == 0:
        return 0.0
    return backoff_delay(attempt, backoff, random)


def refresh_delay(exp: float, now: float) -> float:
    """Seconds until a token expiring at `exp` (seen at `now`) should be refreshed: a fifth of its remaining
    life early, at least 1 s and at most 60 s."""
    remaining = exp - now
    lead = min(60.0, max(1.0, remaining / 5))
    return max(0.0, remaining - lead)


def token_expiry(token: str) -> float | None:
    """A JWT's `exp`, read without verifying it (the server verifies); None when absent or unreadable."""
    try:
        part = token.split(".")[1]
        claims: Any = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)
