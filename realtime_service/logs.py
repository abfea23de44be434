"""Structured JSON logs with tokens redacted everywhere, the access log included (PROTOCOL 2).

Redaction happens in the formatter, so no call site can forget it: `token=` values in URLs and anything shaped
like a JWT are replaced before a line is written.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from realtime_service.protocol.frames import utc_now

JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
TOKEN_PARAM = re.compile(r"((?:^|[?&;\s])(?:access_)?token=)[^&\s\"']*", re.IGNORECASE)
BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """Remove anything token-like from a string."""
    text = TOKEN_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    text = BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return JWT_SHAPE.sub(REDACTED, text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields, all redacted."""

    RESERVED = frozenset([*vars(logging.makeLogRecord({})), "message", "asctime"])

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": utc_now(), "level": record.levelname, "logger": record.name,
                                 "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in self.RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Redact the finished line: no field, however nested, can carry a token past this point.
        return redact(orjson.dumps(entry, default=str).decode())


def configure_logging(level: str) -> None:
    """Send every logger to stderr as redacted JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(level)


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines with the query's token replaced (the mobile client still sends `?token=`)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s", request.method, redact(str(request.rel_url)), response.status,
            extra={"method": request.method, "path": redact(str(request.rel_url)), "status": response.status,
                   "duration_ms": round(time * 1000, 2), "remote": request.remote or ""},
        )
