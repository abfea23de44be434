"""Minimal, fast client-side wire code for the load generator.

A raw WebSocket client (RFC 6455, client side only, no extensions) and a raw HTTP/1.1
keep-alive client, both as asyncio Protocols: the load generator must cost far less CPU
per message than the server it measures, which a general-purpose client does not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

_monotonic = time.monotonic
_loads = orjson.loads

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def mask_payload(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    rep = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(rep, "big")).to_bytes(n, "big")


def encode_client_frame(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """A single masked FIN frame from client to server."""
    if key is None:
        key = os.urandom(4)
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + mask_payload(payload, key)


def encode_server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked frame as a server sends it (used by the self-checks)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, n))
    elif n < 65536:
        head = bytes((b0, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 127)) + n.to_bytes(8, "big")
    return head + payload


class FrameParser:
    """Incremental parser of server-to-client frames. feed() returns complete (opcode, payload)."""

    __slots__ = ("buf", "frag", "frag_op")

    def __init__(self) -> None:
        self.buf = b""
        self.frag_op = -1
        self.frag: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        p = 0
        out: list[tuple[int, bytes]] = []
        while n - p >= 2:
            b0 = buf[p]
            b1 = buf[p + 1]
            ln = b1 & 0x7F
            h = 2
            if ln == 126:
                if n - p < 4:
                    break
                ln = (buf[p + 2] << 8) | buf[p + 3]
                h = 4
            elif ln == 127:
                if n - p < 10:
                    break
                ln = int.from_bytes(buf[p + 2 : p + 10], "big")
                h = 10
            masked = b1 & 0x80
            if masked:
                h += 4
            end = p + h + ln
            if end > n:
                break
            payload = buf[p + h : end]
            if masked:  # servers must not mask, but be lenient
                payload = mask_payload(payload, buf[p + h - 4 : p + h])
            p = end
            op = b0 & 0x0F
            if op >= 0x8:  # control frames are never fragmented
                out.append((op, payload))
            elif b0 & 0x80:  # FIN
                if op == OP_CONT:
                    self.frag.append(payload)
                    out.append((self.frag_op, b"".join(self.frag)))
                    self.frag = []
                    self.frag_op = -1
                else:
                    out.append((op, payload))
            else:
                if op != OP_CONT:
                    self.frag_op = op
                self.frag.append(payload)
        self.buf = buf[p:] if p < n else b""
        return out


class HandshakeError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class ClosedBeforeConnect(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class Sink:
    """Where subscribers account broadcast frames (one per worker process)."""

    __slots__ = (
        "bytes",
        "frames",
        "lat",
        "on_complete",
        "other_frames",
        "t_first",
        "t_last",
    )

    def __init__(self) -> None:
        from array import array

        self.lat = array("d")
        self.frames = 0
        self.other_frames = 0
        self.bytes = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.on_complete: Callable[[Any], None] | None = None


class WSSubscriber(asyncio.Protocol):
    """One WebSocket subscription: handshake with a Bearer header, wait for `connect`, then
    count broadcast frames per offset and record publish-to-receive latency from data.t."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        token: str,
        sink: Sink,
        *,
        expected: int = 0,
        slow: bool = False,
    ) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        self.diagnosis_id = int(path.split("?", 1)[0].rsplit("/", 1)[1])
        self.sink = sink
        self.expected = expected
        self.slow = slow
        self.transport: asyncio.Transport | None = None
        self.handshaking = True
        self.hbuf = b""
        self.parser = FrameParser()
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.connect_frame: dict[str, Any] | None = None
        self.counts = bytearray(expected + 2)
        self.distinct = 0
        self.complete = expected <= 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.ended: str | None = None  # how the connection ended: close / eof / reset / ...
        self.t_end = 0.0
        self.frames_seen = 0
        self.closing = False
        # order check: every broadcast must be the previous one + 1, starting after the connect frame's offset
        self.prev_offset = 0
        self.order_breaks = 0

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.handshaking:
            buf = self.hbuf + data
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.hbuf = buf
                return
            head = buf[:i]
            try:
                status = int(head[9:12])
            except ValueError:
                status = 0
            if status != 101:
                if not self.connected.done():
                    self.connected.set_exception(HandshakeError(status, buf[i + 4 : i + 200].decode("latin-1")))
                self.ended = f"http_{status}"
                assert self.transport is not None
                self.transport.close()
                return
            self.handshaking = False
            self.hbuf = b""
            data = buf[i + 4 :]
            if not data:
                return
        now = _monotonic()
        # fast path: exactly one small unfragmented text frame and nothing buffered (the common case)
        n = len(data)
        if n > 2 and data[0] == 0x81 and not self.parser.buf:
            ln = data[1]
            if ln < 126:
                if n == ln + 2:
                    self.on_text(data[2:], now)
                    return
            elif ln == 126 and n == ((data[2] << 8) | data[3]) + 4:
                self.on_text(data[4:], now)
                return
        for op, payload in self.parser.feed(data):
            if op == OP_TEXT:
                self.on_text(payload, now)
            elif op == OP_PING:
                self.send(OP_PONG, payload)
            elif op == OP_CLOSE:
                self.on_close_frame(payload)
                return
            elif op == OP_BINARY:
                self.sink.other_frames += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended is None:
            if exc is None:
                self.ended = "eof"
            elif isinstance(exc, ConnectionResetError):
                self.ended = "reset"
            else:
                self.ended = type(exc).__name__
        self.t_end = _monotonic()
        if not self.finished.done():
            self.finished.set_result(None)
        if not self.connected.done():
            self.connected.set_exception(ClosedBeforeConnect(self.close_code, self.ended or ""))

    def eof_received(self) -> bool | None:
        return None

    # -- frames -----------------------------------------------------------
    def on_text(self, payload: bytes, now: float) -> None:
        sink = self.sink
        if self.connect_frame is None:
            try:
                msg = _loads(payload)
                if not isinstance(msg, dict):
                    raise TypeError("not an object")
            except (orjson.JSONDecodeError, TypeError):
                # report what the server sent instead of a connect frame, then give up on this connection
                self.ended = "bad_first_frame:" + bytes(payload[:80]).decode("utf-8", "replace")
                if not self.connected.done():
                    self.connected.set_exception(ClosedBeforeConnect(None, self.ended))
                if self.transport is not None:
                    self.transport.close()
                return
            if msg.get("type") == "connect":
                self.connect_frame = msg
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    self.prev_offset = int(msg["data"]["offset"])
                if not self.connected.done():
                    self.connected.set_result(msg)
                if self.slow and self.transport is not None:
                    self.transport.pause_reading()
            else:
                sink.other_frames += 1
            return
        self.frames_seen += 1
        try:
            msg = _loads(payload)
            off = msg.get("offset")
        except (orjson.JSONDecodeError, AttributeError):
            sink.other_frames += 1
            return
        if off is None:
            sink.other_frames += 1
            return
        sink.frames += 1
        sink.bytes += len(payload)
        if off != self.prev_offset + 1:
            self.order_breaks += 1
        if off > self.prev_offset:
            self.prev_offset = off
        counts = self.counts
        if off >= len(counts):
            counts.extend(bytes(off - len(counts) + 64))
        c = counts[off]
        if c == 0:
            self.distinct += 1
        if c < 255:
            counts[off] = c + 1
        try:
            sink.lat.append(now - msg["data"]["t"])
        except (KeyError, TypeError):
            pass
        if sink.t_first == 0.0:
            sink.t_first = now
        sink.t_last = now
        if not self.complete and self.distinct >= self.expected:
            self.complete = True
            if sink.on_complete is not None:
                sink.on_complete(self)

    def on_close_frame(self, payload: bytes) -> None:
        if len(payload) >= 2:
            self.close_code = int.from_bytes(payload[:2], "big")
            self.close_reason = payload[2:].decode("utf-8", "replace")
        else:
            self.close_code = 1005
        self.ended = "close"
        if not self.closing:
            self.send(OP_CLOSE, payload[:2])
        if self.transport is not None:
            self.transport.close()

    def send(self, opcode: int, payload: bytes) -> None:
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.write(encode_client_frame(opcode, payload))

    def close(self, code: int = 1000) -> None:
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        self.closing = True
        if not self.handshaking:
            tr.write(encode_client_frame(OP_CLOSE, code.to_bytes(2, "big")))
        tr.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.ended is None


async def open_subscriber(
    host: str,
    port: int,
    diagnosis_id: int,
    token: str,
    sink: Sink,
    *,
    expected: int = 0,
    slow: bool = False,
    rcvbuf: int | None = None,
    device: str | None = None,
    timeout: float = 15.0,
) -> WSSubscriber:
    """Open a subscription and wait for its `connect` frame (raises on failure)."""
    loop = asyncio.get_running_loop()
    path = f"/ws/{diagnosis_id}" + (f"?device={device}" if device else "")
    proto = WSSubscriber(host, port, path, token, sink, expected=expected, slow=slow)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        await loop.create_connection(lambda: proto, sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        await asyncio.wait_for(asyncio.shield(proto.connected), timeout)
    except BaseException:
        proto.abort()
        raise
    return proto


class HTTPConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.need = -1
        self.status = 0
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            if self.need < 0:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                head = buf[:i].lower()
                self.status = int(head[9:12])
                j = head.find(b"\ncontent-length:")
                if j < 0:
                    if b"transfer-encoding: chunked" in head:
                        self._fail(RuntimeError("chunked responses are not supported"))
                        return
                    self.need = 0
                else:
                    k = head.find(b"\r", j)
                    self.need = int(head[j + 16 : k if k >= 0 else len(head)])
                buf = buf[i + 4 :]
            if len(buf) < self.need:
                break
            body = buf[: self.need]
            buf = buf[self.need :]
            self.need = -1
            w = self.waiter
            self.waiter = None
            if w is not None and not w.done():
                w.set_result((self.status, body))
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(exc or ConnectionResetError("server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def request(self, raw: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
        assert self.transport is not None
        if self.lost:
            raise ConnectionResetError("connection lost")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await asyncio.wait_for(self.waiter, timeout)


async def open_http(host: str, port: int) -> HTTPConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(HTTPConn, host, port)
    return proto


def build_post(host: str, port: int, path: str, token: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
