"""One table of close reasons (PROTOCOL 3.3) and one error hierarchy carrying a code and an HTTP status.

Errors are raised deep (token check, ownership, validation) and mapped to a close frame or an HTTP answer once,
at the edge, so no call site types a close code.
"""

from __future__ import annotations

import enum
from typing import Any


class CloseReason(enum.Enum):
    """Every close the service sends: (WebSocket close code, reason word)."""

    INVALID_TOKEN = (1008, "invalid_token")
    TOKEN_EXPIRED = (1008, "token_expired")
    DIAGNOSIS_NOT_FOUND = (1008, "diagnosis_not_found")
    FORBIDDEN = (1008, "forbidden")
    AUTH_TIMEOUT = (1008, "auth_timeout")
    RATE_LIMITED = (1008, "rate_limited")
    TOO_MANY_CONNECTIONS = (1008, "too_many_connections")
    MESSAGE_TOO_BIG = (1009, "message_too_big")
    INTERNAL_ERROR = (1011, "internal_error")
    SERVICE_RESTART = (1012, "service_restart")
    OWNERSHIP_UNAVAILABLE = (1013, "ownership_unavailable")
    BROKER_UNAVAILABLE = (1013, "broker_unavailable")
    SLOW_CONSUMER = (1013, "slow_consumer")
    HEARTBEAT_TIMEOUT = (1001, "heartbeat_timeout")
    NORMAL = (1000, "")

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def reason(self) -> str:
        return self.value[1]


# What each close means and what a client should do about it. README.md and docs/protocol.md show this table
# (`python -m realtime_service.errors --markdown` prints it; a test fails when a document and this drift apart).
CLOSE_ADVICE: dict[str, tuple[str, str]] = {
    "INVALID_TOKEN": ("bad signature or algorithm; missing, malformed or not yet valid token; a first frame that "
                      "is not `auth`; a refresh with another `sub`", "stop: do not retry with this token"),
    "TOKEN_EXPIRED": ("the token expired, at connect or while connected",
                      "get a fresh token and reconnect (or send a new `auth` frame before `exp`)"),
    "DIAGNOSIS_NOT_FOUND": ("no such diagnosis", "stop: do not retry"),
    "FORBIDDEN": ("the user may not watch this diagnosis (or a service token tried to)", "stop: do not retry"),
    "AUTH_TIMEOUT": ("no `auth` frame within `REALTIME_AUTH_TIMEOUT`", "send `auth` as the first frame, at once"),
    "RATE_LIMITED": ("the client sent more frames than `REALTIME_RATE_LIMIT`/`REALTIME_RATE_BURST` allow",
                     "send less; reconnect with backoff"),
    "TOO_MANY_CONNECTIONS": ("the user already holds `REALTIME_MAX_CONNECTIONS_PER_USER` connections",
                             "close another connection first; retry with backoff"),
    "MESSAGE_TOO_BIG": ("a frame over `REALTIME_MAX_FRAME_BYTES`", "do not send that frame again; reconnect"),
    "INTERNAL_ERROR": ("a bug in the service", "reconnect with backoff and resume"),
    "SERVICE_RESTART": ("the node is shutting down (a deploy) or lost its broker's history",
                        "reconnect at once (another node answers) and resume"),
    "OWNERSHIP_UNAVAILABLE": ("the read replica did not answer in time", "reconnect with backoff and resume"),
    "BROKER_UNAVAILABLE": ("the broker (Redis) did not answer", "reconnect with backoff and resume"),
    "SLOW_CONSUMER": ("the client did not read fast enough and its buffer filled", "reconnect and resume"),
    "HEARTBEAT_TIMEOUT": ("no PONG to the previous PING", "reconnect and resume"),
    "NORMAL": ("a normal close, answering the client's own", "nothing"),
}


def close_code_table() -> str:
    """The close codes as a Markdown table, from CloseReason and CLOSE_ADVICE."""
    lines = ["| code | reason | when | the client should |", "| --- | --- | --- | --- |"]
    for member in CloseReason:
        when, action = CLOSE_ADVICE[member.name]
        reason = f"`{member.reason}`" if member.reason else "(empty)"
        lines.append(f"| {member.code} | {reason} | {when} | {action} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m realtime_service.errors --markdown` prints the close-code table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m realtime_service.errors",
                                     description="Print the WebSocket close codes the service sends.")
    parser.add_argument("--markdown", action="store_true", help="as a Markdown table (the only format)")
    parser.parse_args(argv)
    print(close_code_table(), end="")
    return 0


class ServiceError(Exception):
    """Base error: a machine code, an HTTP status and, where it applies, a close reason."""

    code = "internal_error"
    status = 500
    close = CloseReason.INTERNAL_ERROR

    def __init__(self, message: str = "", fields: dict[str, Any] | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code.replace("_", " ")
        self.fields = fields or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            error["fields"] = self.fields
        return {"error": error}


class InvalidToken(ServiceError):
    code, status, close = "invalid_token", 401, CloseReason.INVALID_TOKEN


class TokenExpired(ServiceError):
    code, status, close = "token_expired", 401, CloseReason.TOKEN_EXPIRED


class Forbidden(ServiceError):
    code, status, close = "forbidden", 403, CloseReason.FORBIDDEN


class DiagnosisNotFound(ServiceError):
    code, status, close = "diagnosis_not_found", 404, CloseReason.DIAGNOSIS_NOT_FOUND


class NotFound(ServiceError):
    code, status = "not_found", 404


class OwnershipUnavailable(ServiceError):
    code, status, close = "ownership_unavailable", 503, CloseReason.OWNERSHIP_UNAVAILABLE


class BrokerUnavailable(ServiceError):
    code, status, close = "broker_unavailable", 503, CloseReason.BROKER_UNAVAILABLE


class ShuttingDown(ServiceError):
    code, status, close = "service_restart", 503, CloseReason.SERVICE_RESTART


class TooManyConnections(ServiceError):
    code, status, close = "too_many_connections", 429, CloseReason.TOO_MANY_CONNECTIONS


class BodyTimeout(ServiceError):
    code, status = "body_timeout", 408


class HostNotAllowed(ServiceError):
    code, status = "host_not_allowed", 403


class IdempotencyKeyReused(ServiceError):
    code, status = "idempotency_key_reused", 422


class BadRequest(ServiceError):
    code, status = "bad_request", 400


class ValidationFailed(ServiceError):
    code, status = "validation_error", 422


class BodyTooLarge(ServiceError):
    code, status = "body_too_large", 413


class Unauthorized(ServiceError):
    code, status = "unauthorized", 401


if __name__ == "__main__":
    raise SystemExit(main())
