"""The per-connection protocol state machine, without a socket (PROTOCOL 3.1, 3.5).

The WebSocket handler feeds it each inbound frame and carries out the returned action; every rule about
client frames (auth phase, bad frames, rate limit) lives here and is tested as a table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from realtime_service.errors import CloseReason
from realtime_service.protocol.ratelimit import TokenBucket

MAX_DEVICE_LENGTH = 128
MAX_OFFSET = 2**63 - 1  # offsets are 64-bit signed integers everywhere (broker, Redis, PROTOCOL 3.7)
MAX_OFFSET_DIGITS = 19  # len(str(MAX_OFFSET)); leading zeros beyond it are refused too


class Phase(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """What a client asks to resume from: `since`/`epoch` (3.7) and its device id."""

    since: int | None = None
    epoch: str | None = None
    device: str = "default"


@dataclass(frozen=True, slots=True)
class Authenticate:
    """First-frame auth: verify the token, check ownership, then send `connect`."""

    token: str
    resume: ResumeRequest
    given: frozenset[str] = frozenset()  # which resume fields the frame carried


@dataclass(frozen=True, slots=True)
class Refresh:
    """A later `auth` frame: a new token for the same `sub`."""

    token: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Ack:
    offset: int


@dataclass(frozen=True, slots=True)
class Reject:
    """A bad client frame: answer with an `error` frame, keep the connection."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Close:
    reason: CloseReason


Action = Authenticate | Refresh | Ping | Ack | Reject | Close


def parse_resume(since: Any, epoch: Any, device: Any) -> ResumeRequest | str:
    """Validate resume fields from a query string or an auth frame; a string is the complaint."""
    if since is not None:
        if isinstance(since, str):
            # Bound the digits before int(): Python refuses (ValueError) strings over 4,300 digits, and an
            # offset never needs more than 19.
            if not (since.isascii() and since.isdigit()) or len(since) > MAX_OFFSET_DIGITS:
                return f"since must be an integer from 0 to {MAX_OFFSET}"
            since = int(since)
        if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= MAX_OFFSET:
            return f"since must be an integer from 0 to {MAX_OFFSET}"
    if epoch is not None and not isinstance(epoch, str):
        return "epoch must be a string"
    if device is None or device == "":
        device = "default"
    if not isinstance(device, str) or len(device) > MAX_DEVICE_LENGTH or not device.isprintable():
        return f"device must be a printable string of at most {MAX_DEVICE_LENGTH} characters"
    return ResumeRequest(since=since, epoch=epoch, device=device)


class Session:
    """One connection's protocol state. `authenticated_by_request` is True when a header/query token was used."""

    __slots__ = ("_bucket", "phase")

    def __init__(self, rate: float, burst: int, now: float, authenticated_by_request: bool) -> None:
        self._bucket = TokenBucket(rate, burst, now)
        self.phase = Phase.OPEN if authenticated_by_request else Phase.AWAITING_AUTH

    def opened(self) -> None:
        """The first-frame auth succeeded."""
        self.phase = Phase.OPEN

    def closed(self) -> None:
        self.phase = Phase.CLOSED

    def receive(self, payload: str | bytes, binary: bool, now: float) -> Action:
        """One inbound data frame -> the action to carry out."""
        if self.phase is Phase.CLOSED:
            return Close(CloseReason.NORMAL)
        if not self._bucket.take(now):
            self.phase = Phase.CLOSED
            return Close(CloseReason.RATE_LIMITED)
        if self.phase is Phase.AWAITING_AUTH:
            return self._first_frame(payload, binary)
        if binary:
            return Reject("binary_frame", "binary frames are not part of the protocol; send JSON text")
        try:
            frame = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return Reject("invalid_json", "the frame is not valid JSON")
        if not isinstance(frame, dict):
            return Reject("invalid_frame", "a frame is a JSON object with a `type`")
        kind = frame.get("type")
        if kind == "ping":
            return Ping()
        if kind == "ack":
            offset = frame.get("offset")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                return Reject("invalid_ack", "ack needs an integer `offset` >= 0")
            return Ack(offset)
        if kind == "auth":
            token = frame.get("token")
            if not isinstance(token, str) or not token:
                return Close(CloseReason.INVALID_TOKEN)
            return Refresh(token)
        if not isinstance(kind, str):
            return Reject("missing_type", "a frame needs a string `type`")
        return Reject("unknown_type", f"unknown frame type {kind[:64]!r}; expected ping, ack or auth")

    def _first_frame(self, payload: str | bytes, binary: bool) -> Action:
        if binary:
            return Close(CloseReason.INVALID_TOKEN)
        try:
            frame = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return Close(CloseReason.INVALID_TOKEN)
        if not isinstance(frame, dict) or frame.get("type") != "auth":
            return Close(CloseReason.INVALID_TOKEN)
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            return Close(CloseReason.INVALID_TOKEN)
        resume = parse_resume(frame.get("since"), frame.get("epoch"), frame.get("device"))
        if isinstance(resume, str):
            return Close(CloseReason.INVALID_TOKEN)
        given = frozenset(k for k in ("since", "epoch", "device") if frame.get(k) not in (None, ""))
        return Authenticate(token, resume, given)
