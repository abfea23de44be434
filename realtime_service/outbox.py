"""A bounded per-connection outbox: `offer()` is synchronous and says when the client fell too far behind.

Bounded in messages and in bytes (PROTOCOL 3.10); the caller closes an overflowing connection `slow_consumer`.
Items are (frame bytes, offset or None); a PING marker is `PING` and counts no bytes.
"""

from __future__ import annotations

from collections import deque
from typing import Final

PING: Final = b""


class Outbox:
    """Frames waiting for one connection's writer.

    Most of the time a connection's outbox is empty, or holds the one frame of the current broadcast until the
    end of the loop iteration: that frame sits in `_one`, and a deque (about 600 bytes) exists only while two or
    more frames wait. An idle connection holds no container at all.
    """

    __slots__ = ("_forced", "_more", "_one", "bytes", "max_bytes", "max_messages")

    def __init__(self, max_bytes: int, max_messages: int) -> None:
        self._one: tuple[bytes, int | None] | None = None  # the oldest waiting frame
        self._more: deque[tuple[bytes, int | None]] | None = None  # the frames after it
        self.bytes = 0
        self._forced = 0  # bytes queued by force(): they do not count against the limit
        self.max_bytes = max_bytes
        self.max_messages = max_messages

    def _append(self, item: tuple[bytes, int | None]) -> None:
        if self._one is None and not self._more:
            self._one = item
        elif self._more is None:
            self._more = deque((item,))
        else:
            self._more.append(item)

    def offer(self, frame: bytes, offset: int | None = None) -> bool:
        """Queue a frame; False (and nothing queued) when that would pass a limit."""
        size = len(frame)
        if len(self) >= self.max_messages or self.bytes - self._forced + size > self.max_bytes:
            return False
        self._append((frame, offset))
        self.bytes += size
        return True

    def force(self, frame: bytes, offset: int | None = None) -> None:
        """Queue regardless of limits: the connect frame and the replay must reach a new connection whole."""
        self._append((frame, offset))
        self.bytes += len(frame)
        self._forced += len(frame)

    def ping(self) -> None:
        """Queue a protocol PING behind the frames already waiting, so its PONG confirms them."""
        self._append((PING, None))

    def pop(self) -> tuple[bytes, int | None]:
        item = self._one
        if item is not None:
            self._one = None
        else:
            more = self._more
            if not more:
                raise IndexError("pop from an empty outbox")
            item = more.popleft()
            if not more:
                self._more = None  # an idle connection keeps no deque
        frame = item[0]
        self.bytes -= len(frame)
        if self._forced:
            self._forced = max(0, self._forced - len(frame))
        return item

    def clear(self) -> None:
        self._one = None
        self._more = None
        self.bytes = 0
        self._forced = 0

    def __len__(self) -> int:
        more = self._more
        return (self._one is not None) + (len(more) if more else 0)

    def __bool__(self) -> bool:
        return self._one is not None or bool(self._more)
