"""A bounded per-connection outbox: `offer()` is synchronous and says when the client fell too far behind.

Bounded in messages and in bytes (PROTOCOL 3.10); the caller closes an overflowing connection `slow_consumer`.
Items are (frame bytes, offset or None); a PING marker is `PING` and counts no bytes.
"""

from __future__ import annotations

from collections import deque
from typing import Final

PING: Final = b""


class Outbox:
    """Frames waiting for one connection's writer."""

    __slots__ = ("_forced", "_items", "bytes", "max_bytes", "max_messages")

    def __init__(self, max_bytes: int, max_messages: int) -> None:
        self._items: deque[tuple[bytes, int | None]] = deque()
        self.bytes = 0
        self._forced = 0  # bytes queued by force(): they do not count against the limit
        self.max_bytes = max_bytes
        self.max_messages = max_messages

    def offer(self, frame: bytes, offset: int | None = None) -> bool:
        """Queue a frame; False (and nothing queued) when that would pass a limit."""
        size = len(frame)
        if len(self._items) >= self.max_messages or self.bytes - self._forced + size > self.max_bytes:
            return False
        self._items.append((frame, offset))
        self.bytes += size
        return True

    def force(self, frame: bytes, offset: int | None = None) -> None:
        """Queue regardless of limits: the connect frame and the replay must reach a new connection whole."""
        self._items.append((frame, offset))
        self.bytes += len(frame)
        self._forced += len(frame)

    def ping(self) -> None:
        """Queue a protocol PING behind the frames already waiting, so its PONG confirms them."""
        self._items.append((PING, None))

    def pop(self) -> tuple[bytes, int | None]:
        frame, offset = self._items.popleft()
        self.bytes -= len(frame)
        if self._forced:
            self._forced = max(0, self._forced - len(frame))
        return frame, offset

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
        self._forced = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)
