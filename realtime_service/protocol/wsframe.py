"""RFC 6455 framing of server frames (never masked), so one broadcast is framed once for every recipient."""

from __future__ import annotations

import struct

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")

TEXT = 0x81  # FIN + text
PING = 0x89  # FIN + ping
PONG = 0x8A  # FIN + pong
CLOSE = 0x88  # FIN + close


def frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """The whole WebSocket frame for `payload`: header then bytes, ready for transport.write."""
    size = len(payload)
    if size < 126:
        return _SHORT.pack(opcode, size) + payload
    if size < 65536:
        return _MEDIUM.pack(opcode, 126, size) + payload
    return _LONG.pack(opcode, 127, size) + payload


def text(payload: bytes) -> bytes:
    return frame(payload, TEXT)


def ping(payload: bytes) -> bytes:
    return frame(payload[:125], PING)


def pong(payload: bytes) -> bytes:
    return frame(payload[:125], PONG)


def close(code: int, reason: bytes = b"") -> bytes:
    """A close frame; the reason is cut to fit a control frame's 125 bytes."""
    return frame(struct.pack("!H", code) + reason[:123], CLOSE)
