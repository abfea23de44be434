"""One subscriber as the core sees it: identity, outbox, delivery state. It never touches a socket.

The web adapter gives it a Transport (wake the writer, close with a reason); everything here is synchronous so
fan-out can hand a frame to thousands of connections without awaiting any of them.
"""

from __future__ import annotations

import enum
from typing import Protocol

from realtime_service.errors import CloseReason
from realtime_service.outbox import Outbox
from realtime_service.protocol import wsframe


class Transport(Protocol):
    """What the core may ask of a live WebSocket. Both calls return at once."""

    def wake(self) -> None:
        """Frames were queued: let the writer run."""

    def close(self, reason: CloseReason) -> None:
        """Close the connection with this reason (idempotent)."""


class _Released:
    """The transport of a closed connection: nothing may reach the socket any more. Holding the real one after the
    close would make a reference cycle (the web adapter's transport points back at its connection), so every
    closed connection's objects, and aiohttp's and the loop's behind them, would wait for the cycle collector
    instead of being freed by reference counting when the handler returns: under churn that garbage piled up to
    tens of MiB, and the allocator kept the pages (the soak's memory, issue 9)."""

    __slots__ = ()

    def wake(self) -> None:
        pass

    def close(self, reason: CloseReason) -> None:
        pass


class Phase(enum.Enum):
    SYNCING = 1  # registered, replay not yet sent: live frames wait in `pending`
    LIVE = 2
    CLOSED = 3


class Connection:
    """A subscriber of one diagnosis."""

    __slots__ = (
        "awaiting_pong",
        "close_reason",
        "confirm_next",
        "confirming",
        "device",
        "diagnosis_id",
        "epoch",
        "expires_at",
        "highest_sent",
        "kept",
        "kept_written",
        "outbox",
        "pending",
        "phase",
        "ping_marks",
        "ping_seq",
        "session",
        "subscribed",
        "transport",
        "user_id",
        "written_offset",
    )

    def __init__(self, session: str, diagnosis_id: int, user_id: int, device: str, outbox: Outbox,
                 transport: Transport, expires_at: float) -> None:
        self.session = session
        self.diagnosis_id = diagnosis_id
        self.user_id = user_id
        self.device = device
        self.outbox = outbox
        self.transport = transport
        self.expires_at = expires_at
        self.epoch = ""
        self.phase = Phase.SYNCING
        self.pending: list[tuple[bytes, int | None]] = []
        self.highest_sent = 0  # highest offset handed to the outbox
        self.written_offset = 0  # highest offset written to the socket
        self.ping_seq = 0
        self.ping_marks: dict[int, int] = {}  # ping payload -> written_offset when that ping was written
        self.awaiting_pong = False
        self.close_reason: CloseReason | None = None
        self.subscribed = False  # holds one reference on the broker's subscription to its diagnosis
        self.confirming: object | None = None  # the cursor write under way (the node's task), if any
        self.confirm_next = 0  # the highest offset confirmed while that write was under way
        self.kept: tuple[str, ...] = ()  # ids of the kept personal messages its replay carried, until confirmed
        self.kept_written = False  # the replay carrying them was written to the socket

    def deliver(self, frame: bytes, offset: int | None) -> bool:
        """Hand a live frame over, already WebSocket-framed (`wsframe.text`); False when closed or overflowing."""
        if self.phase is Phase.LIVE:
            if offset is not None and offset <= self.highest_sent:
                return True  # already sent (in the replay, or by a catch-up that overlapped it): never twice
            if self.outbox.offer(frame, offset):
                if offset is not None:
                    self.highest_sent = offset
                self.transport.wake()
                return True
            self.close(CloseReason.SLOW_CONSUMER)
            return False
        if self.phase is Phase.SYNCING:
            if len(self.pending) >= self.outbox.max_messages:
                self.close(CloseReason.SLOW_CONSUMER)
                return False
            self.pending.append((frame, offset))
            return True
        return False

    def go_live(self, first: list[bytes], seen_up_to: int) -> None:
        """Send the connect frame and replay, then live frames buffered meanwhile that come after `seen_up_to`."""
        if self.phase is Phase.CLOSED:
            return  # closed while syncing (revoked, expired, draining): nothing more to send
        for index, frame in enumerate(first):
            # The last of these frames brings the client up to `seen_up_to`: a PONG after it confirms that much.
            self.outbox.force(wsframe.text(frame), seen_up_to if index == len(first) - 1 else None)
        self.highest_sent = max(self.highest_sent, seen_up_to)
        pending, self.pending = self.pending, []
        self.phase = Phase.LIVE
        for frame, offset in pending:
            if offset is not None and offset <= seen_up_to:
                continue  # already in the replay, or older than what the client asked for
            if not self.deliver(frame, offset):
                return
        self.transport.wake()

    def reply(self, frame: bytes) -> None:
        """Answer the client (pong, error; JSON bytes) through the outbox, so frames leave in order."""
        if self.phase is Phase.CLOSED:
            return
        if self.outbox.offer(wsframe.text(frame)):
            self.transport.wake()
        else:
            self.close(CloseReason.SLOW_CONSUMER)

    def ping(self) -> None:
        """Queue a protocol PING; its PONG will confirm what was written before it (PROTOCOL 3.7)."""
        if self.phase is Phase.CLOSED:
            return
        self.awaiting_pong = True
        self.outbox.ping()
        self.transport.wake()

    def wrote(self) -> None:
        """The transport wrote what was queued: the replay, and the kept messages in it, left for the client."""
        self.kept_written = True

    def next_ping(self, written_offset: int) -> bytes:
        """The payload of the PING being written now; remembers what was written before it for its PONG."""
        self.ping_seq += 1
        self.ping_marks[self.ping_seq] = written_offset
        return str(self.ping_seq).encode()

    def close(self, reason: CloseReason) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.close_reason = reason
        self.pending = []
        transport, self.transport = self.transport, _Released()
        transport.close(reason)
