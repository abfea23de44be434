"""A Connection's Transport over aiohttp: one writer task per connection drains the outbox to the socket.

Fan-out only queues and wakes; this task alone awaits the network, so a slow client stalls nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from realtime_service.connection import Connection
from realtime_service.errors import CloseReason
from realtime_service.metrics import Metrics
from realtime_service.outbox import PING

log = logging.getLogger("realtime.ws")

FLUSH_BEFORE_CLOSE = 2.0  # seconds a closing connection may take to write what is already queued
CLOSE_HANDSHAKE = 2.0
ABORT_AFTER = 5.0  # seconds a closed connection may keep unsent bytes


class WebSocketTransport:
    """Writer task and close sequence for one WebSocketResponse."""

    __slots__ = ("_closer", "_idle", "_wake", "_writer", "conn", "metrics", "request", "ws")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, metrics: Metrics) -> None:
        self.ws = ws
        self.request = request
        self.metrics = metrics
        self.conn: Connection | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    def start(self, conn: Connection) -> None:
        self.conn = conn
        self._writer = asyncio.create_task(self._write_loop())

    # -- Transport ---------------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def close(self, reason: CloseReason) -> None:
        if self._closer is None:
            self.metrics.disconnects.labels(reason.reason or "normal").inc()
            if reason is CloseReason.SLOW_CONSUMER:
                self.metrics.slow_consumers.inc()
            self._closer = asyncio.create_task(self._close(reason))

    # -- tasks ---------------------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        conn = self.conn
        assert conn is not None
        outbox, ws = conn.outbox, self.ws
        try:
            while True:
                while outbox:
                    self._idle.clear()
                    frame, offset = outbox.pop()
                    if frame is PING:
                        conn.ping_seq += 1
                        conn.ping_marks[conn.ping_seq] = conn.written_offset
                        await ws.ping(str(conn.ping_seq).encode())
                        continue
                    await ws.send_frame(frame, WSMsgType.TEXT)
                    if offset is not None:
                        conn.written_offset = offset
                self._idle.set()
                await self._wake.wait()
                self._wake.clear()
        except (ConnectionError, RuntimeError):
            self._idle.set()
            # the peer went away; the reader notices and cleans up
            outbox.clear()

    async def _close(self, reason: CloseReason) -> None:
        conn, writer = self.conn, self._writer
        if conn is not None and writer is not None and reason is not CloseReason.SLOW_CONSUMER:
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), FLUSH_BEFORE_CLOSE)
        if writer is not None:
            writer.cancel()
        if conn is not None:
            conn.outbox.clear()
        try:
            await asyncio.wait_for(self.ws.close(code=reason.code, message=reason.reason.encode()),
                                   CLOSE_HANDSHAKE)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            transport = self.request.transport
            if transport is not None:
                if not transport.is_closing():
                    transport.close()
                # A client that never reads would hold the write buffer forever: give the close frame time to
                # leave, then cut the connection.
                asyncio.get_running_loop().call_later(ABORT_AFTER, transport.abort)

    async def finish(self) -> None:
        """The handler is done: stop the writer, let a close in progress end, free everything."""
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._closer), CLOSE_HANDSHAKE + FLUSH_BEFORE_CLOSE + 1)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        if self.conn is not None:
            self.conn.outbox.clear()
