"""RFC 6455 framing of server frames (never masked), so one broadcast is framed once for every recipient."""

from __future__ import annotations

import struct

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")

TEXT = 0x81  # FIN + text
PING = 0x89  # FIN + ping


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
