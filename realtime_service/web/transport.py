"""A Connection's Transport over aiohttp: a writer task drains the outbox; the handler closes.

Fan-out only queues and wakes; the writer task alone awaits the network, so a slow client stalls nobody else.
Closing is done by the handler task after the reader task is stopped: aiohttp closes the socket at once when
`close()` races a pending `receive()`, which loses the close frame (and queued frames) to a TCP reset when the
client is still sending.
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

    __slots__ = ("_done", "_idle", "_wake", "_writer", "conn", "metrics", "request", "ws")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, metrics: Metrics) -> None:
        self.ws = ws
        self.request = request
        self.metrics = metrics
        self.conn: Connection | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._done: asyncio.Future[CloseReason | None] = asyncio.get_running_loop().create_future()

    def start(self, conn: Connection) -> None:
        self.conn = conn
        self._writer = asyncio.create_task(self._write_loop())

    # -- Transport ---------------------------------------------------------------------------------
    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    def close(self, reason: CloseReason) -> None:
        if not self._done.done():
            self.metrics.disconnects.labels(reason.reason or "normal").inc()
            if reason is CloseReason.SLOW_CONSUMER:
                self.metrics.slow_consumers.inc()
            self._done.set_result(reason)

    def peer_gone(self) -> None:
        """The reader saw the client close or vanish."""
        if not self._done.done():
            self.metrics.disconnects.labels("client").inc()
            self._done.set_result(None)

    # -- tasks ---------------------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        conn = self.conn
        assert conn is not None
        outbox, ws = conn.outbox, self.ws
        try:
            while True:
                while outbox:
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
            outbox.clear()
            self._idle.set()
            self.peer_gone()

    async def run_until_closed(self, reader: asyncio.Task[None]) -> None:
        """Wait for a close request or the peer's departure, then close in order and free everything."""
        reason = await self._done
        conn, writer = self.conn, self._writer
        if reason is not None and reason is not CloseReason.SLOW_CONSUMER and writer is not None:
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), FLUSH_BEFORE_CLOSE)
        for task in (writer, reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if conn is not None:
            conn.outbox.clear()
        try:
            if reason is not None:
                await asyncio.wait_for(self.ws.close(code=reason.code, message=reason.reason.encode()),
                                       CLOSE_HANDSHAKE)
            else:
                await asyncio.wait_for(self.ws.close(), CLOSE_HANDSHAKE)
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
