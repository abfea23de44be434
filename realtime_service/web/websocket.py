"""One WebSocket after its upgrade, owned by the service instead of by aiohttp's per-request machinery.

aiohttp parses the upgrade request, runs the middleware and routes it; the handler then checks the handshake,
writes the 101 itself and takes the socket over (`hijack`): the transport's protocol becomes a `WebSocket`,
and aiohttp forgets the connection, so its request handler, the parsed request and headers, the handler's
tasks and the WebSocketResponse with its message queue are freed once the handler returns. What stays per
connection is this protocol object, aiohttp's frame parser (the C one) and the core's `Connection`: about a
quarter of what a live aiohttp WebSocket held (issue 11; tests/bench/README.md has the breakdown).

Frames are pushed, not pulled: the parser hands each client message to `on_message` during `data_received`, so
a live connection has no task of its own. Before it is live (waiting for the `auth` frame, while it is admitted
and attached) messages wait in a small list that the handler reads with `receive()`.

Writes are as before: fan-out queues frames (framed once per broadcast) and marks the connection; once per
loop iteration the `Flusher` writes each marked connection's queue with one `transport.write`. Only a socket
that pushes back gets a task, which waits for it to drain. The close sequence runs in one task per closing
connection: write what is queued (bounded), the close frame, wait for the client's (bounded), close.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
from typing import Any, Protocol, cast

from aiohttp import WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_websocket import (
    WS_KEY,
    WebSocketError,
    WebSocketReader,
    WebSocketWriter,
    WSCloseCode,
    WSMessage,
    WSMessageTextBytes,
    ws_ext_gen,
    ws_ext_parse,
)

from realtime_service.connection import Connection
from realtime_service.errors import CloseReason
from realtime_service.metrics import Metrics
from realtime_service.outbox import PING
from realtime_service.protocol import wsframe

log = logging.getLogger("realtime.ws")

FLUSH_BEFORE_CLOSE = 2.0  # seconds a closing connection may take to write what is already queued
CLOSE_HANDSHAKE = 2.0  # seconds to wait for the client's close frame after ours
SILENT_PEER_CLOSE = 0.2  # a peer dropped by the heartbeat answers nothing: send the close frame, wait no longer
ABORT_AFTER = 5.0  # seconds a closed connection may keep unsent bytes

CLOSED = WSMessage(WSMsgType.CLOSED, None, None)  # what receive() returns once the connection is gone

_OPEN, _CLOSING, _PEER_GONE = 0, 1, 2


class Reader(Protocol):
    """What reads a live connection (web.ws's `Live`)."""

    def on_message(self, msg: WSMessage) -> None:
        """A text, binary or PONG message from the client."""

    def ended(self) -> None:
        """Closing was decided (by the service or the client): release the connection, then `finish()`."""


class Handshake:
    """A valid upgrade request's answer: the 101 head to write, and the negotiated permessage-deflate."""

    __slots__ = ("compress", "head", "notakeover")

    def __init__(self, head: bytes, compress: int, notakeover: bool) -> None:
        self.head = head
        self.compress = compress
        self.notakeover = notakeover


def handshake(request: web.Request, compression: bool) -> Handshake | str:
    """Check an upgrade request (RFC 6455 4.2.1); the answer to write, or what is wrong with it."""
    headers = request.headers
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        return "this endpoint needs an Upgrade: websocket request"
    if "upgrade" not in {token.strip().lower() for token in headers.get("Connection", "").split(",")}:
        return "the upgrade request needs Connection: Upgrade"
    if headers.get("Sec-WebSocket-Version", "").strip() not in ("13", "8", "7"):
        return "unsupported Sec-WebSocket-Version (use 13)"
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return "Sec-WebSocket-Key must be 16 bytes in base64"
    except (binascii.Error, ValueError):
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_KEY).digest())
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Accept: " + accept]
    compress, notakeover = 0, False
    if compression:
        compress, notakeover = ws_ext_parse(headers.get("Sec-WebSocket-Extensions"), isserver=True)
        if compress:
            lines.append(b"Sec-WebSocket-Extensions: " + ws_ext_gen(compress=compress, isserver=True,
                                                                     server_notakeover=notakeover).encode())
    return Handshake(b"\r\n".join(lines) + b"\r\n\r\n", compress, notakeover)


class _Frames(WebSocketDataQueue):
    """Where aiohttp's frame parser puts each message: straight into the connection, no queue."""

    __slots__ = ("socket",)

    def __init__(self, socket: WebSocket) -> None:
        # No super().__init__(): its deque and bound methods (about 700 bytes) would never be used. The parser
        # reads only `_size` and `_limit`, both 0 here, so it never stalls.
        self.socket: WebSocket | None = socket

    def feed_data(self, data: WSMessage | WSMessageTextBytes, size: int) -> None:
        socket = self.socket
        if socket is not None:
            socket.message(cast(WSMessage, data))  # decode_text=True: text arrives as str

    def feed_eof(self) -> None:
        pass  # the protocol learns of the end itself (eof_received, connection_lost)

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        socket = self.socket
        if socket is not None:
            socket.failed(exc)


class Flusher:
    """Writes every connection that got frames during this loop iteration, once, right after it."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[WebSocket] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, socket: WebSocket) -> None:
        self._dirty.append(socket)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for socket in dirty:
            try:
                socket.flush()
            except Exception:  # one broken connection must not stall the others of this batch
                log.exception("flushing a connection failed")
                socket.close(CloseReason.INTERNAL_ERROR)


class WebSocket(BaseProtocol):
    """The asyncio protocol of one upgraded connection, and the core's Transport for it (wake, close).

    `live` is what reads the connection once it is attached (web.ws's `Live`): it gets every message, and is
    told when the connection ends, to release it and run `finish()`.
    """

    __slots__ = ("_drainer", "_error_code", "_frames", "_got_close", "_marked", "_peer_close", "_pending",
                 "_reader", "_reason", "_shake", "_state", "_stopped", "_told", "_waiter", "_writer", "conn",
                 "expiry", "flusher", "live", "metrics")

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, flusher: Flusher, max_msg_size: int,
                 shake: Handshake) -> None:
        super().__init__(loop)
        self._upgraded = True  # aiohttp's BaseProtocol then never touches an HTTP parser
        self.metrics = metrics
        self.flusher = flusher
        self._frames = _Frames(self)
        self._reader = WebSocketReader(self._frames, max_msg_size, compress=bool(shake.compress),
                                       decode_text=True)
        # With permessage-deflate each message is deflated per connection by aiohttp's writer; without it (the
        # default) frames framed once per broadcast are written as they are.
        self._writer: WebSocketWriter | None = None
        self._shake: Handshake | None = shake
        self._told = False  # `live` was told the connection ended
        self.conn: Connection | None = None
        self.live: Reader | None = None
        self.expiry: list[Any] | None = None  # its entry in the node's ExpiryHeap (token expiry)
        self._pending: list[WSMessage] | None = []  # messages before it is live; None once live
        self._waiter: asyncio.Future[None] | None = None
        self._peer_close: asyncio.Future[None] | None = None
        self._got_close = False
        self._error_code = 0  # a protocol error of the client: the close code to answer with
        self._state = _OPEN
        self._reason: CloseReason | None = None
        self._marked = False
        self._stopped = False
        self._drainer: asyncio.Task[None] | None = None

    # -- asyncio protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        shake, self._shake = self._shake, None  # the 101 head is written once: keep no copy per connection
        if shake is not None and shake.compress:
            self._writer = WebSocketWriter(self, self.transport, compress=shake.compress,
                                           notakeover=shake.notakeover)

    def data_received(self, data: bytes) -> None:
        self._reader.feed_data(data)

    def eof_received(self) -> bool:
        self._gone()
        return False  # let the transport close itself

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._gone()

    # -- messages from the parser ---------------------------------------------------------------------------
    def message(self, msg: WSMessage) -> None:
        kind = msg.type
        if kind is WSMsgType.CLOSE:
            self._got_close = True
            if self._peer_close is not None and not self._peer_close.done():
                self._peer_close.set_result(None)
            self._peer_ended()
            return
        if self._state != _OPEN:
            return  # closing: nothing more the client says matters
        if kind is WSMsgType.PING:
            self._write(wsframe.pong(msg.data))
            return
        pending = self._pending
        if pending is None:
            assert self.live is not None
            self.live.on_message(msg)
            return
        pending.append(msg)
        self._wake_reader()

    def failed(self, exc: BaseException) -> None:
        """The parser refused the client's bytes (bad framing, invalid UTF-8, a message too big)."""
        code = exc.code if isinstance(exc, WebSocketError) else WSCloseCode.PROTOCOL_ERROR
        if code == WSCloseCode.MESSAGE_TOO_BIG:
            if self.conn is not None:
                self.conn.close(CloseReason.MESSAGE_TOO_BIG)  # the core forgets it; finish() answers 1009
            else:
                self.close(CloseReason.MESSAGE_TOO_BIG)
            return
        if self._state == _OPEN:
            self._error_code = code
        self._peer_ended()

    def _peer_ended(self) -> None:
        if self._state == _OPEN:
            self._state = _PEER_GONE
            self.metrics.disconnects.labels("client").inc()
        self._ended()

    def _gone(self) -> None:
        """The socket ended (EOF or lost): whoever waits is told, and a live connection ends."""
        if self._peer_close is not None and not self._peer_close.done():
            self._peer_close.set_result(None)
        self._peer_ended()

    def _ended(self) -> None:
        """Closing was decided: a live connection's owner releases it; a handler waiting in receive() wakes."""
        if self._pending is None:
            if not self._told and self.live is not None:
                self._told = True
                self.live.ended()
        else:
            self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- before it is live: the handler reads ------------------------------------------------------------
    async def receive(self, timeout: float) -> WSMessage:
        """The next client message before the connection is live; CLOSED once closing was decided (see
        `reason`). TimeoutError after `timeout`."""
        pending = self._pending
        assert pending is not None, "receive() is only for a connection that is not live yet"
        if not pending and self._state == _OPEN:
            self._waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        if self._state != _OPEN:
            return CLOSED
        return pending.pop(0)

    def go_live(self, live: Reader) -> None:
        """From now on messages go to `live` (`on_message`, `ended`), starting with those that came while the
        connection was admitted and attached; `ended` at once if it closed meanwhile."""
        pending, self._pending = self._pending or [], None
        self.live = live
        for msg in pending:
            if self._state != _OPEN:
                break
            live.on_message(msg)
        if self._state != _OPEN and not self._told:
            self._told = True
            live.ended()

    @property
    def reason(self) -> CloseReason | None:
        """The reason closing was decided with, when the service decided it."""
        return self._reason

    # -- Transport (the core's view) ------------------------------------------------------------------------
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
            self._ended()

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

    # -- writing ----------------------------------------------------------------------------------------------
    def _write(self, frame: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame)

    def flush(self) -> None:
        """Write what is queued now, or hand it to the drain task when the socket pushes back."""
        self._marked = False
        conn = self.conn
        if conn is None or self._stopped or self._drainer is not None:
            return
        if not conn.outbox:
            return
        if self._writer is not None or self._paused:
            self._drainer = asyncio.create_task(self._drain())
            return
        self._write_queued()

    def _write_queued(self) -> None:
        conn = self.conn
        transport = self.transport
        assert conn is not None
        outbox = conn.outbox
        if transport is None or transport.is_closing():
            outbox.clear()
            self._gone()
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
        """The socket pushed back (or frames must be deflated): wait until it drains, write, repeat."""
        conn = self.conn
        assert conn is not None
        try:
            while conn.outbox and not self._stopped:
                if self.transport is None or self.transport.is_closing():
                    raise ConnectionResetError("connection lost")
                if self._paused:
                    await self._drain_helper()
                if self._writer is None:
                    self._write_queued()
                else:
                    await self._write_deflated(self._writer)
        except (ConnectionError, RuntimeError):
            conn.outbox.clear()
            self._gone()
        finally:
            self._drainer = None

    async def _write_deflated(self, writer: WebSocketWriter) -> None:
        conn = self.conn
        assert conn is not None
        while conn.outbox:
            frame, offset = conn.outbox.pop()
            if frame is PING:
                await writer.send_frame(conn.next_ping(conn.written_offset), WSMsgType.PING)
                continue
            await writer.send_frame(_payload(frame), WSMsgType.TEXT)
            if offset is not None:
                conn.written_offset = offset
            if conn.kept:
                conn.wrote()

    # -- closing ------------------------------------------------------------------------------------------------
    async def finish(self) -> None:
        """After the connection was released: write what is queued (bounded), then the close handshake, and
        free everything. A heartbeat drop does not wait for a handshake that never comes."""
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
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if reason is not None:
                transport.write(wsframe.close(reason.code, reason.reason.encode()))
            else:  # answering the client's close frame, or its protocol error
                transport.write(wsframe.close(self._error_code or WSCloseCode.OK, b""))
            if not self._got_close:
                self._peer_close = self._loop.create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._peer_close, SILENT_PEER_CLOSE if silent else CLOSE_HANDSHAKE)
                self._peer_close = None
        self.abort_later()
        # Nothing of it is needed any more: break the cycles (parser <-> protocol, protocol <-> reader, writer),
        # so reference counting frees it all now, not the cycle collector some day (issue 9's soak memory).
        self._frames.socket = None
        self.live = None
        self._writer = None

    def abort_later(self) -> None:
        transport = self.transport
        if transport is not None:
            if not transport.is_closing():
                transport.close()
            # A client that never reads would hold the write buffer forever: give the close frame time to
            # leave, then cut the connection.
            self._loop.call_later(ABORT_AFTER, transport.abort)

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.abort()


def hijack(request: web.Request, socket: WebSocket, shake: Handshake) -> bool:
    """Take the upgraded connection from aiohttp and answer 101; False when the client is already gone.

    aiohttp keeps the bytes the client sent after its upgrade request (the first frames, sent before the 101
    arrived) as the request handler's tail; they are handed to the new protocol. Then aiohttp is told the
    connection is lost, with the transport already taken from it, so it neither closes the socket nor keeps
    anything of it: once the handler returns, its request, tasks and parser are garbage.
    """
    handler = request.protocol
    transport = request.transport
    if handler is None or transport is None or transport.is_closing() or not handler._upgraded:
        return False
    tail: bytes = handler._message_tail
    handler._message_tail = b""
    handler.transport = None  # so its connection_lost() does not close the socket,
    handler._task_handler = None  # nor cancel the task this handler runs in (handler_cancellation=True)
    handler.connection_lost(None)
    transport.set_protocol(socket)
    socket.connection_made(transport)
    transport.write(shake.head)
    with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError):
        transport.resume_reading()  # aiohttp may have paused it while the tail grew
    if tail:
        socket.data_received(tail)
    return True


def _payload(frame: bytes) -> bytes:
    """The payload of a frame made by wsframe (unmasked, so the header is 2, 4 or 10 bytes)."""
    size = frame[1] & 0x7F
    return frame[2 + (2 if size == 126 else 8 if size == 127 else 0):]

