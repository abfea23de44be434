"""A minimal WebSocket client over a raw socket: see the handshake answer as sent, and be a client that never reads.

aiohttp's client hides refused handshakes behind exceptions and always drains the socket; these tests need the
status and headers of the upgrade answer, and a peer whose receive buffer stays full (PROTOCOL 3.10).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from dataclasses import dataclass, field

from yarl import URL

HANDSHAKE_TIMEOUT = 10.0
MAX_HEAD = 64 * 1024


@dataclass
class RawWebSocket:
    """One TCP connection after an upgrade request: the answer's status, headers and body, and the socket."""

    sock: socket.socket
    status: int
    headers: dict[str, str]
    body: bytes = b""
    extra: bytes = field(default=b"", repr=False)  # bytes read past the head (frames already sent)

    async def send_text(self, text: str) -> None:
        """Send one masked text frame, as a client must."""
        await self.send_frame(0x1, text.encode())

    async def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """Send one masked frame; `fin=False` starts or continues a fragmented message."""
        await asyncio.get_running_loop().sock_sendall(self.sock, encode_frame(opcode, payload, fin))

    async def recv_frame(self, timeout: float = HANDSHAKE_TIMEOUT) -> tuple[int, bytes]:
        """Read one (unmasked) server frame: (opcode, payload). Raises ConnectionError at EOF."""
        head = await self._take(2, timeout)
        opcode, size = head[0] & 0x0F, head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self._take(2, timeout))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self._take(8, timeout))[0]
        return opcode, await self._take(size, timeout)

    async def _take(self, count: int, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        while len(self.extra) < count:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.extra += chunk
        data, self.extra = self.extra[:count], self.extra[count:]
        return data

    def close(self) -> None:
        """Drop the TCP connection without a close handshake."""
        self.sock.close()


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (final unless `fin` is False)."""
    mask = os.urandom(4)
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def handshake(url: str, headers: dict[str, str] | None = None, rcvbuf: int | None = None,
                    timeout: float = HANDSHAKE_TIMEOUT) -> RawWebSocket:
    """Send an upgrade request to `url` (ws://host:port/path?query) and read the answer's head (and body, if any).

    With `rcvbuf`, the socket's receive buffer is shrunk before connecting, so the TCP window stays tiny.
    """
    target = URL(url)
    assert target.host is not None
    assert target.port is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (target.host, target.port)), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        given = headers or {}
        host = given.get("Host", f"{target.host}:{target.port}")  # a test may name another Host
        lines = [f"GET {target.raw_path_qs} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in given.items() if name != "Host"]
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = await asyncio.wait_for(_read_head(loop, sock), timeout)
    except BaseException:
        sock.close()
        raise
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    parsed: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    conn = RawWebSocket(sock, status, parsed)
    if status == 101:
        conn.extra = rest
        return conn
    length = int(parsed.get("content-length", "0"))
    body = rest
    while len(body) < length:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, length - len(body)), timeout)
        if not chunk:
            break
        body += chunk
    conn.body = body
    return conn


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionError(f"the server closed before answering the upgrade; got {data[:200]!r}")
        data += chunk
        if len(data) > MAX_HEAD:
            raise ConnectionError("the upgrade answer's head is too large")
    return data
