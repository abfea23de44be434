"""The HTTP server around the app: timeouts aiohttp lacks, and its logs kept to what is the server's fault.

aiohttp closes a keep-alive connection that stays idle (`keepalive_timeout`), but it has no deadline for the
request head itself and none for the body: 2,000 connections that never send a byte, or a head or body sent a
byte at a time, would hold their sockets for good. `EdgeRunner` adds the head deadline (`http_head_timeout`,
counted from the moment the connection is accepted, as Go's ReadHeaderTimeout and nginx's client_header_timeout
do); the body rules are in web.http's middleware, where the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from realtime_service.logs import RedactingAccessLogger, ServerLog
from realtime_service.settings import Settings
from realtime_service.web.state import STATE

log = logging.getLogger("realtime.http")

SWEEP_EVERY = 1.0  # seconds between looks for connections past their head deadline (at most this late)
SHUTDOWN_TIMEOUT = 2.0
LINGER = 2.0  # seconds aiohttp reads (and drops) the unread rest of a body after answering (its default: 10)


def server_options(app: web.Application, settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiohttp's request handler: keep-alive, quiet client faults, redacted access log."""
    repeats = app[STATE].repeats
    return {"keepalive_timeout": settings.http_keepalive_timeout, "lingering_time": LINGER,
            "access_log_class": RedactingAccessLogger.folding(repeats),
            "logger": ServerLog(logging.getLogger("realtime.http.server"), repeats)}


class HeadDeadline:
    """Closes every connection that has not delivered a complete request head within `timeout` of being accepted.

    A connection counts as served once the app has seen a request on it (`served`, called by the middleware);
    after that aiohttp's keep-alive timeout bounds its idle time. Looking every SWEEP_EVERY seconds costs one set
    lookup per open connection, and needs no hook inside aiohttp's protocol.
    """

    def __init__(self, server: web.Server, timeout: float, on_close: Any = None) -> None:
        self._server = server
        self._timeout = timeout
        self._first_seen: dict[RequestHandler, float] = {}
        self._served: set[RequestHandler] = set()
        self._sweeps = 0
        self._task: asyncio.Task[None] | None = None
        self._on_close = on_close

    def served(self, protocol: object) -> None:
        if isinstance(protocol, RequestHandler):
            self._served.add(protocol)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def sweep(self, now: float) -> int:
        """Close the connections past their deadline; returns how many."""
        connections = self._server.connections
        served = self._served
        first_seen = {}
        closed = 0
        for handler in connections:
            if handler in served:
                continue
            seen = self._first_seen.get(handler, now)
            if now - seen >= self._timeout:
                handler.force_close()
                closed += 1
            else:
                first_seen[handler] = seen
        self._first_seen = first_seen
        self._sweeps += 1
        # Forget connections aiohttp no longer holds (closed, or WebSockets the service took over) at every
        # sweep: this set would otherwise keep their request handlers alive (about 2 KB each).
        self._served = served.intersection(connections)
        if closed and self._on_close is not None:
            self._on_close(closed)
        return closed

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(SWEEP_EVERY, self._timeout / 4))
            try:
                self.sweep(loop.time())
            except Exception:  # a sweep must never stop the next one
                log.exception("closing connections without a request head failed")


class EdgeRunner(web.AppRunner):
    """An AppRunner with the service's HTTP options and the head deadline; `run_server` and tests use it alike."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        settings = app[STATE].settings
        options = {"handle_signals": False, "shutdown_timeout": SHUTDOWN_TIMEOUT, **server_options(app, settings)}
        options.update(kwargs)
        super().__init__(app, **options)
        self._deadline: HeadDeadline | None = None

    async def setup(self) -> None:
        await super().setup()
        state = self.app[STATE]
        assert self.server is not None
        self._deadline = HeadDeadline(self.server, state.settings.http_head_timeout, self._closed_idle)
        state.edge.served = self._deadline.served
        self._deadline.start()

    def _closed_idle(self, count: int) -> None:
        self.app[STATE].repeats.info(log, "head_timeout", "closed %d connection(s) that sent no complete request "
                                     "head in time", count, count=count)

    async def cleanup(self) -> None:
        if self._deadline is not None:
            await self._deadline.stop()
            self.app[STATE].edge.served = None
        await super().cleanup()
