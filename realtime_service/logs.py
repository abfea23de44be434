"""Structured JSON logs with tokens redacted everywhere, the access log included (PROTOCOL 2).

Redaction happens in the formatter, so no call site can forget it: `token=` values in URLs and anything shaped
like a JWT are replaced before a line is written.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, RequestPayloadError, StreamResponse

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


UNPARSED = "UNKNOWN"  # the method aiohttp gives a request it could not parse


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines with the query's token replaced (the mobile client still sends `?token=`).

    Requests aiohttp could not parse (answered 400 before any handler) are folded by `repeats` when set, as their
    error lines are: `folding` makes the per-app class (aiohttp builds one logger per connection).
    """

    repeats: Repeats | None = None

    @classmethod
    def folding(cls, repeats: Repeats) -> type[RedactingAccessLogger]:
        return type("FoldingAccessLogger", (cls,), {"repeats": repeats})

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        extra: dict[str, Any] = {"method": request.method, "path": redact(str(request.rel_url)),
                                 "status": response.status, "duration_ms": round(time * 1000, 2),
                                 "remote": request.remote or ""}
        if request.method == UNPARSED and self.repeats is not None:
            held = self.repeats.admit("access_unparsed")
            if held is None:
                return
            if held:
                extra["suppressed"] = held
        self.logger.info("%s %s %s", request.method, extra["path"], response.status, extra=extra)


class Repeats:
    """At most `burst` lines per kind in any `window` seconds, so no client can fill the logs with one mistake.

    The first line let through after some were held back says how many (`suppressed`), so nothing is hidden
    from an operator, only folded. Kinds are a fixed vocabulary (error classes), so the table stays small.
    """

    MAX_KINDS = 256

    def __init__(self, burst: int = 5, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self._clock = clock
        self._kinds: dict[str, list[float]] = {}  # kind -> [window start, lines in window, held back]

    def admit(self, kind: str) -> int | None:
        """None: hold this line back. Otherwise the number of lines of this kind held back since the last one."""
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window:
            held = int(state[2]) if state is not None else 0
            if state is None and len(self._kinds) >= self.MAX_KINDS:
                self._kinds.clear()
            self._kinds[kind] = [now, 1, 0]
            return held
        if state[1] < self.burst:
            state[1] += 1
            held, state[2] = int(state[2]), 0
            return held
        state[2] += 1
        return None

    def info(self, logger: logging.Logger, kind: str, msg: str, *args: Any, **extra: Any) -> None:
        """Log one INFO line of this kind, unless too many went out lately."""
        if not logger.isEnabledFor(logging.INFO):
            return
        held = self.admit(kind)
        if held is None:
            return
        if held:
            extra["suppressed"] = held
        logger.info(msg, *args, extra={"kind": kind, **extra})


CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError, ConnectionError, TimeoutError)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger handed to aiohttp's HTTP server (`logger=`): what a client did wrong is not a server error.

    aiohttp logs a malformed request (a line over 8,190 bytes, a bad header, Content-Length with
    Transfer-Encoding) and a client that hung up as ERROR with a traceback. Those become one INFO line without a
    traceback, rate-limited per kind by `Repeats`; anything else (a real bug) is passed on unchanged.
    """

    def __init__(self, logger: logging.Logger, repeats: Repeats) -> None:
        super().__init__(logger, {})
        self.repeats = repeats

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info is True else None
        if level >= logging.WARNING and isinstance(exc, CLIENT_FAULTS):
            peer = args[0] if args and isinstance(args[0], str) else None
            self.repeats.info(self.logger, type(exc).__name__, "refused a malformed or broken HTTP request: %s",
                              _first_line(exc), error=type(exc).__name__, remote=peer or "")
            return
        self.logger.log(level, msg, *args, **kwargs)
