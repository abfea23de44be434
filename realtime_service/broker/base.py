"""The broker interface and the values it trades in. Invariants are stated on the interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """An Idempotency-Key already taken: by a publish still running somewhere, or with its stored answer."""

    done: bool
    fingerprint: str
    result: bytes  # empty while pending


PublicationHandler = Callable[[Publication], None]
# (diagnosis id, the epoch now current, or None for every connection): live history was interrupted
LostHandler = Callable[[int, str | None], None]
ControlHandler = Callable[[bytes], None]
# (diagnosis id, user id, exclude_session, message id, frame, origin node) of a personal message another node
# published
PersonalHandler = Callable[[int, int, str | None, str, bytes, str], None]


class Broker(Protocol):
    """Offsets, history, cursors, personal inboxes and idempotency records, for one node or many.

    Invariants every implementation keeps:
    - `publish` assigns the next offset of the diagnosis (1, 2, 3, ... per epoch, no gaps, never reused), stores
      the publication in history and hands it to the handler of every subscribed node, atomically per diagnosis:
      two publishes never get one offset, and every node sees a diagnosis's publications in offset order.
    - History keeps the newest `history_size` publications for at most `history_ttl` seconds.
    - The epoch of a diagnosis changes exactly when its history is lost; offsets then start again at 1.
    - Cursors only move forward within an epoch.
    - History keeps at most `history_max_bytes` of encoded frames per diagnosis (oldest evicted first).
    - Personal messages wait in a bounded inbox per (diagnosis, user) for at most `history_ttl`, until a
      connection confirmed them.
    - The handler of a subscribed diagnosis never sees offset N+1 before N, nor one offset twice. When that can
      no longer be kept (history lost, or a gap it cannot fill), the lost-handler is told instead, so the node
      closes that diagnosis's connections for a resume.
    - `subscribe` returns only once publications of the diagnosis reach the handler: every publish that starts
      after it returns is delivered (the connect seam reads history after it).
    - `publish` returns after its publication went to this node's handler, when this node is subscribed.
    - An Idempotency-Key is reserved atomically: of two callers, exactly one gets to publish.
    """

    def set_handler(self, handler: PublicationHandler) -> None:
        """Where publications for subscribed diagnoses go (called synchronously, in offset order)."""

    def set_lost_handler(self, handler: LostHandler) -> None:
        """Told when a subscribed diagnosis's live history was interrupted (new epoch, or an unfillable gap)."""

    def set_control_handler(self, handler: ControlHandler) -> None:
        """Where control messages of other nodes go (revoke)."""

    def set_personal_handler(self, handler: PersonalHandler) -> None:
        """Where personal messages published on other nodes go, for subscribed diagnoses."""

    async def publish_personal(self, diagnosis_id: int, user_id: int, exclude_session: str | None,
                               message_id: str, frame: bytes, origin: str) -> None:
        """Hand a personal message to the other nodes serving the diagnosis (no-op on one node)."""

    async def publish_control(self, message: bytes) -> None:
        """Send a control message to every other node (no-op on one node)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise BrokerUnavailable when the broker does not answer."""

    async def subscribe(self, diagnosis_id: int) -> None:
        """Start receiving publications of this diagnosis (the node has a local connection to it)."""

    async def unsubscribe(self, diagnosis_id: int) -> None: ...

    async def publish(self, diagnosis_id: int, body: bytes, exclude_session: str | None = None) -> Publication:
        """Give `body` (an encoded frame without position) the next offset; store and deliver it.

        Raises BrokerUnavailable when the broker does not answer in time; nothing is published then.
        """

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

    async def push_personal(self, diagnosis_id: int, user_id: int, message_id: str, frame: bytes) -> None:
        """Keep a personal message for a user with no connection (bounded, oldest dropped first)."""

    async def kept_personal(self, diagnosis_id: int, user_id: int) -> list[tuple[str, bytes]]:
        """The kept personal messages (message id, frame), oldest first. They stay until `drop_personal`."""

    async def drop_personal(self, diagnosis_id: int, user_id: int, message_ids: Sequence[str]) -> None:
        """A connection confirmed these: they leave the inbox (PROTOCOL 3.8)."""

    async def reserve_idempotency(self, scope: str, key: str, fingerprint: str, token: str,
                                  lease: float) -> IdempotencyRecord | None:
        """Take the key for `token` (None), or say who has it: a pending publish or a stored answer.

        A pending reservation lapses after `lease` seconds, so a node that died while publishing does not hold
        the key for the whole TTL.
        """

    async def complete_idempotency(self, scope: str, key: str, token: str, result: bytes) -> None:
        """Store the answer of the publish that holds the reservation; kept for the idempotency TTL."""

    async def release_idempotency(self, scope: str, key: str, token: str) -> None:
        """Give the key back after the publish failed (nothing was published), so a retry may run."""
