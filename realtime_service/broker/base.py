"""The broker interface and the values it trades in. Invariants are stated on the interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a diagnosis's history stands: the newest offset (0 if none) in one epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Publication:
    """One broadcast with its place in the stream; `frame` is the encoded frame every client receives."""

    diagnosis_id: int
    offset: int
    epoch: str
    frame: bytes
    exclude_session: str | None = None


@dataclass(frozen=True, slots=True)
class History:
    """Retained broadcasts after some offset, with the stream's position when they were read."""

    position: StreamPosition
    oldest: int  # oldest retained offset; position.offset + 1 when nothing is retained
    publications: tuple[Publication, ...]


@dataclass(frozen=True, slots=True)
class Cursor:
    """The highest offset one device of one user has confirmed, in one epoch (PROTOCOL 3.7)."""

    user_id: int
    device: str
    offset: int
    epoch: str
    confirmed_at: float  # unix time


PublicationHandler = Callable[[Publication], None]


class Broker(Protocol):
    """Offsets, history, cursors, personal inboxes and idempotency records, for one node or many.

    Invariants every implementation keeps:
    - `publish` assigns the next offset of the diagnosis (1, 2, 3, ... per epoch, no gaps, never reused), stores
      the publication in history and hands it to the handler of every subscribed node, atomically per diagnosis:
      two publishes never get one offset, and every node sees a diagnosis's publications in offset order.
    - History keeps the newest `history_size` publications for at most `history_ttl` seconds.
    - The epoch of a diagnosis changes exactly when its history is lost; offsets then start again at 1.
    - Cursors only move forward within an epoch.
    - Personal messages wait in a bounded inbox per (diagnosis, user) for at most `history_ttl`, and are taken
      once.
    """

    def set_handler(self, handler: PublicationHandler) -> None:
        """Where publications for subscribed diagnoses go (called synchronously, in offset order)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise BrokerUnavailable when the broker does not answer."""

    async def subscribe(self, diagnosis_id: int) -> None:
        """Start receiving publications of this diagnosis (the node has a local connection to it)."""

    async def unsubscribe(self, diagnosis_id: int) -> None: ...

    async def publish(self, diagnosis_id: int, body: bytes, exclude_session: str | None = None) -> Publication:
        """Give `body` (an encoded frame without position) the next offset; store and deliver it."""

    async def position(self, diagnosis_id: int) -> StreamPosition:
        """The newest offset and epoch; creates the stream (and its epoch) on first use."""

    async def history(self, diagnosis_id: int, since: int) -> History:
        """Retained publications with offset > since, in order."""

    async def retained_count(self) -> int:
        """How many publications are retained over all diagnoses."""

    async def cursor(self, diagnosis_id: int, user_id: int, device: str) -> Cursor | None: ...

    async def init_cursor(self, diagnosis_id: int, user_id: int, device: str, position: StreamPosition) -> Cursor:
        """The device's cursor, created at `position` if it has none yet."""

    async def confirm(self, diagnosis_id: int, user_id: int, device: str, offset: int, epoch: str) -> None:
        """Move the cursor forward to `offset` (never back), in `epoch`; stamps the time."""

    async def reset_cursor(self, diagnosis_id: int, user_id: int, device: str, position: StreamPosition) -> None:
        """Set the cursor to `position` (after a replay that started over in a new epoch)."""

    async def cursors(self, diagnosis_id: int) -> list[Cursor]: ...

    async def push_personal(self, diagnosis_id: int, user_id: int, frame: bytes) -> None:
        """Keep a personal message for a user with no connection (bounded, oldest dropped first)."""

    async def take_personal(self, diagnosis_id: int, user_id: int) -> list[bytes]:
        """The kept personal messages, oldest first; they are removed (delivered once)."""

    async def idempotent_result(self, scope: str, key: str) -> bytes | None:
        """The stored answer of an earlier publish with this key by this caller, if within the TTL."""

    async def store_idempotent_result(self, scope: str, key: str, result: bytes) -> None: ...
