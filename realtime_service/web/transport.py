"""A Connection's Transport over aiohttp: batched direct writes of pre-framed bytes; the handler closes.

Fan-out only queues and marks the connection; once per event-loop iteration the Flusher writes each marked
connection's queue with one `transport.write` of frames framed once per broadcast. Only a connection whose socket
pushes back gets a task, which waits for the socket to drain: a slow client stalls nobody else, and an idle one
costs no task. Closing is done by the handler after the reader stops: aiohttp closes the socket at once when
`close()` races a pending `receive()`, which loses the close frame to a TCP reset while the client still sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from realtime_service.connection import Connection
from realtime_service.errors import CloseReason
from realtime_service.metrics import Metrics
from realtime_service.outbox import PING
from realtime_service.protocol import wsframe

log = logging.getLogger("realtime.ws")

FLUSH_BEFORE_CLOSE = 2.0  # seconds a closing connection may take to write what is already queued
CLOSE_HANDSHAKE = 2.0
SILENT_PEER_CLOSE = 0.2  # a peer dropped by the heartbeat answers nothing: send the close frame, wait no longer
ABORT_AFTER = 5.0  # seconds a closed connection may keep unsent bytes


class Flusher:
    """Writes every connection that got frames during this loop iteration, once, right after it."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[WebSocketTransport] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, transport: WebSocketTransport) -> None:
        self._dirty.append(transport)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for transport in dirty:
            try:
                transport.flush()
            except Exception:  # one broken connection must not stall the others of this batch
                log.exception("flushing a connection failed")
                transport.close(CloseReason.INTERNAL_ERROR)


class WebSocketTransport:
    """Writes and the close sequence for one WebSocketResponse."""

    __slots__ = ("_done", "_drainer", "_idle", "_marked", "_protocol", "_stopped", "_transport", "conn", "direct",
                 "flusher", "metrics", "request", "ws")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, metrics: Metrics, flusher: Flusher,
                 direct: bool = True) -> None:
        self.ws = ws
        self.request = request
        self.metrics = metrics
        self.flusher = flusher
        self.direct = direct  # False with permessage-deflate: frames then go through aiohttp's writer
        self.conn: Connection | None = None
        # looked up once: request.protocol / request.transport are properties, and flush runs per frame
        self._protocol = request.protocol
        self._transport = request.transport
        self._marked = False
        self._stopped = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._drainer: asyncio.Task[None] | None = None
        self._done: asyncio.Future[CloseReason | None] = asyncio.get_running_loop().create_future()

    def start(self, conn: Connection) -> None:
        self.conn = conn

    # -- Transport ---------------------------------------------------------------------------------
    def wake(self) -> None:
        self._idle.clear()
        if not self._marked and self._drainer is None and not self._stopped:
            self._marked = True
            self.flusher.mark(self)

    def close(self, reason: CloseReason) -> None:
        if not self._done.done():
            self.metrics.disconnects.labels(reason.reason or "normal").inc()
            if reason is CloseReason.SLOW_CONSUMER:
                self.metrics.slow_consumers.inc()
            self._done.set_result(reason)

    @property
    def outcome(self) -> str:
        """How it ended, as the disconnects metric labels it: the close reason, `normal`, or `client`."""
        if not self._done.done():
            return "open"
        reason = self._done.result()
        return "client" if reason is None else reason.reason or "normal"

    def peer_gone(self) -> None:
        """The reader saw the client close or vanish."""
        if not self._done.done():
            self.metrics.disconnects.labels("client").inc()
            self._done.set_result(None)

    # -- writing ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is queued now, or hand it to the drain task when the socket pushes back."""
        self._marked = False
        conn = self.conn
        if conn is None or self._stopped or self._drainer is not None:
            return
        if not conn.outbox:
            self._idle.set()
            return
        protocol = self._protocol
        if not self.direct or (protocol is not None and protocol.writing_paused):
            self._drainer = asyncio.create_task(self._drain())
            return
        self._write_queued()

    def _write_queued(self) -> None:
        conn = self.conn
        transport = self._transport
        assert conn is not None
        outbox = conn.outbox
        if transport is None or transport.is_closing():
            outbox.clear()
            self._idle.set()
            self.peer_gone()
            return
        if len(outbox) == 1:  # the common case at low rates: one frame, no list, no join
            frame, offset = outbox.pop()
            if frame is not PING:
                transport.write(frame)
                if offset is not None:
                    conn.written_offset = offset
                if conn.kept:
                    conn.wrote()
                self._idle.set()
                return
            outbox.force(frame, offset)
        chunks: list[bytes] = []
        written = conn.written_offset
        while outbox:
            frame, offset = outbox.pop()
            if frame is PING:
                chunks.append(wsframe.ping(conn.next_ping(written)))
                continue
            chunks.append(frame)
            if offset is not None:
                written = offset
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        conn.written_offset = written
        if conn.kept:
            conn.wrote()
        self._idle.set()

    async def _drain(self) -> None:
        """The socket pushed back: wait until it drains, write, repeat until the queue is empty."""
        conn = self.conn
        assert conn is not None
        try:
            while conn.outbox and not self._stopped:
                await self._writable()
                if self.direct:
                    self._write_queued()
                else:
                    await self._write_through_aiohttp()
        except (ConnectionError, RuntimeError):
            conn.outbox.clear()
            self.peer_gone()
        finally:
            self._drainer = None
            if not conn.outbox:
                self._idle.set()

    async def _writable(self) -> None:
        protocol = self.request.protocol
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        if protocol is None or not protocol.writing_paused:
            return
        # aiohttp's own writers wait on this too (there is no public drain on a server response)
        await protocol._drain_helper()

    async def _write_through_aiohttp(self) -> None:
        """With compression on, aiohttp must frame (and deflate) each message itself."""
        conn = self.conn
        assert conn is not None
        while conn.outbox:
            frame, offset = conn.outbox.pop()
            if frame is PING:
                await self.ws.ping(conn.next_ping(conn.written_offset))
                continue
            await self.ws.send_str(_payload(frame).decode())
            if offset is not None:
                conn.written_offset = offset
            if conn.kept:
                conn.wrote()

    # -- closing -----------------------------------------------------------------------------------------
    async def run_until_closed(self, reader: asyncio.Task[None] | None,
                               release: Callable[[], Awaitable[None]] | None = None) -> None:
        """Wait for a close request or the peer's departure, then close in order and free everything.

        `release` runs as soon as the close is decided, before the flush and the close handshake, so the core
        stops counting the connection at once (a heartbeat drop must not wait for a handshake that never comes).
        """
        reason = await self._done
        conn = self.conn
        if release is not None:
            try:
                await release()
            except Exception:
                log.exception("releasing a closed connection failed")
        silent = reason is CloseReason.HEARTBEAT_TIMEOUT
        if reason is not None and reason is not CloseReason.SLOW_CONSUMER and not silent and conn is not None:
            self.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), FLUSH_BEFORE_CLOSE)
        self._stopped = True
        for task in (self._drainer, reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if conn is not None:
            conn.outbox.clear()
        try:
            if reason is not None:
                await asyncio.wait_for(self.ws.close(code=reason.code, message=reason.reason.encode()),
                                       SILENT_PEER_CLOSE if silent else CLOSE_HANDSHAKE)
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


def _payload(frame: bytes) -> bytes:
    """The payload of a frame made by wsframe (unmasked, so the header is 2, 4 or 10 bytes)."""
    size = frame[1] & 0x7F
    return frame[2 + (2 if size == 126 else 8 if size == 127 else 0):]
