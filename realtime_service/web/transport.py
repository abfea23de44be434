"""A Connection's Transport over aiohttp: batched direct writes of pre-framed bytes; the handler closes.

Fan-out only queues and marks the connection; once per event-loop iteration the Flusher writes each marked
connection's queue with one `transport.write` of frames framed once per broadcast. Only a connection whose socket
pushes back gets a task, which waits for the socket to drain: a slow client stalls nobody else, and an idle one
costs no task. Closing is done by the handler after the reader stops: aiohttp closes the socket at once when
`close()` races a pending `receive()`, which loses the close frame to a TCP reset while the client still sends.

One task per connection: the handler itself reads. When the core closes a connection (revoke, slow consumer,
heartbeat, drain, token expiry), `close()` wakes the handler's pending `receive()` by queueing WAKE on the
WebSocket's reader; the handler leaves its read loop and closes in order. Nothing is created per connection that
an idle connection does not need: no event, no future, no second task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WSMessage

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
WAKE = WSMessage(WSMsgType.ERROR, object(), None)  # queued on a reader to end the handler's receive()

_OPEN, _CLOSING, _PEER_GONE = 0, 1, 2


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

    __slots__ = ("_drainer", "_marked", "_protocol", "_reason", "_state", "_stopped", "_transport", "conn", "direct",
                 "expiry", "flusher", "metrics", "ws")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, metrics: Metrics, flusher: Flusher,
                 direct: bool = True) -> None:
        self.ws = ws
        self.metrics = metrics
        self.flusher = flusher
        self.direct = direct  # False with permessage-deflate: frames then go through aiohttp's writer
        self.conn: Connection | None = None
        # looked up once: request.protocol / request.transport are properties, and flush runs per frame
        self._protocol = request.protocol
        self._transport = request.transport
        self._marked = False
        self._stopped = False
        self._state = _OPEN
        self._reason: CloseReason | None = None
        self._drainer: asyncio.Task[None] | None = None
        self.expiry: list[Any] | None = None  # its entry in the node's ExpiryHeap (token expiry)

    def start(self, conn: Connection) -> None:
        self.conn = conn

    # -- Transport ---------------------------------------------------------------------------------
    def wake(self) -> None:
        if not self._marked and self._drainer is None and not self._stopped:
            self._marked = True
            self.flusher.mark(self)

    def close(self, reason: CloseReason) -> None:
        if self._state == _OPEN:
            self._state = _CLOSING
            self._reason = reason
            self.metrics.disconnects.labels(reason.reason or "normal").inc()
            if reason is CloseReason.SLOW_CONSUMER:
                self.metrics.slow_consumers.inc()
            reader = getattr(self.ws, "_reader", None)  # aiohttp's message queue, that receive() waits on
            if reader is not None:
                reader.feed_data(WAKE, 0)

    @property
    def closed(self) -> bool:
        """Closing was decided: by the core (with a reason) or by the peer."""
        return self._state != _OPEN

    @property
    def outcome(self) -> str:
        """How it ended, as the disconnects metric labels it: the close reason, `normal`, or `client`."""
        if self._state == _OPEN:
            return "open"
        reason = self._reason
        return "client" if reason is None else reason.reason or "normal"

    def peer_gone(self) -> None:
        """The reader saw the client close or vanish."""
        if self._state == _OPEN:
            self._state = _PEER_GONE
            self.metrics.disconnects.labels("client").inc()

    # -- writing ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is queued now, or hand it to the drain task when the socket pushes back."""
        self._marked = False
        conn = self.conn
        if conn is None or self._stopped or self._drainer is not None:
            return
        if not conn.outbox:
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

    async def _writable(self) -> None:
        protocol = self._protocol
        transport = self._transport
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
    async def finish(self) -> None:
        """After the handler left its read loop and released the connection: write what is queued (bounded), then
        the close handshake, and free everything. A heartbeat drop does not wait for a handshake that never comes.
        """
        reason = self._reason
        conn = self.conn
        silent = reason is CloseReason.HEARTBEAT_TIMEOUT
        if reason is not None and reason is not CloseReason.SLOW_CONSUMER and not silent and conn is not None:
            self.flush()
            drainer = self._drainer
            if drainer is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, ConnectionError, RuntimeError):
                    await asyncio.wait_for(asyncio.shield(drainer), FLUSH_BEFORE_CLOSE)
        self._stopped = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._drainer
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
            self.abort_later()

    def abort_later(self) -> None:
        transport = self._transport
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
