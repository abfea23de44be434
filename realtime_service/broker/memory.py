"""The in-memory broker: one node, everything lost on restart (so every restart is a new epoch)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from realtime_service.broker.base import (
    ControlHandler,
    Cursor,
    History,
    IdempotencyRecord,
    LostHandler,
    PersonalHandler,
    Publication,
    PublicationHandler,
    StreamPosition,
)
from realtime_service.protocol.frames import replay_size, with_position


@dataclass(slots=True)
class _Stream:
    epoch: str
    offset: int = 0
    bytes: int = 0
    # created by the first publish: a diagnosis that is only watched holds no deque (~600 bytes; issue 11)
    entries: deque[tuple[float, Publication]] | None = None


@dataclass(slots=True)
class _Reservation:
    expires: float
    fingerprint: str
    token: str
    result: bytes | None = None


SWEEP_INTERVAL = 60.0  # seconds between sweeps of expired history and inboxes
MAX_DEVICES_PER_USER = 64  # device ids are client-chosen: bound what one user can make the node remember
MAX_IDEMPOTENCY_RECORDS = 200_000


def _new_epoch() -> str:
    return secrets.token_hex(8)


class MemoryBroker:
    """Broker for a single node. Nothing here awaits, so publish is atomic per diagnosis by construction."""

    def __init__(self, history_size: int, history_ttl: float, inbox_size: int, idempotency_ttl: float,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 history_max_bytes: int = 1 << 20) -> None:
        self._history_size = history_size
        self._history_max_bytes = history_max_bytes
        self._history_ttl = history_ttl
        self._inbox_size = inbox_size
        self._idempotency_ttl = idempotency_ttl
        self._clock = clock
        self._wall = wall
        self._streams: dict[int, _Stream] = {}
        self._cursors: dict[int, dict[tuple[int, str], Cursor]] = {}
        self._inboxes: dict[tuple[int, int], deque[tuple[float, str, bytes]]] = {}
        self._idempotency: OrderedDict[tuple[str, str], _Reservation] = OrderedDict()
        self._handler: PublicationHandler = lambda publication: None
        self._retained = 0
        self._sweeper: asyncio.Task[None] | None = None

    def set_handler(self, handler: PublicationHandler) -> None:
        self._handler = handler

    def set_lost_handler(self, handler: LostHandler) -> None:
        return None  # one process: history is never interrupted while it runs

    def set_control_handler(self, handler: ControlHandler) -> None:
        return None

    def set_personal_handler(self, handler: PersonalHandler) -> None:
        return None

    async def publish_personal(self, diagnosis_id: int, user_id: int, exclude_session: str | None,
                               message_id: str, frame: bytes, origin: str) -> None:
        return None

    async def publish_control(self, message: bytes) -> None:
        return None  # no other node to tell

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Drop what retention no longer keeps: a diagnosis nobody touches would otherwise hold its history and
        inboxes past the TTL. Each stream keeps its offset and epoch, so a later resume is still judged right."""
        for stream in self._streams.values():
            self._trim(stream)
        horizon = self._clock() - self._history_ttl
        for key in [k for k, inbox in self._inboxes.items() if not inbox or inbox[-1][0] <= horizon]:
            del self._inboxes[key]
        self._expire_idempotency()

    async def ping(self) -> None:
        return None

    async def subscribe(self, diagnosis_id: int) -> None:
        return None

    async def unsubscribe(self, diagnosis_id: int) -> None:
        return None

    def _stream(self, diagnosis_id: int) -> _Stream:
        stream = self._streams.get(diagnosis_id)
        if stream is None:
            stream = self._streams[diagnosis_id] = _Stream(epoch=_new_epoch())
        return stream

    def _trim(self, stream: _Stream) -> None:
        entries = stream.entries
        if not entries:
            return
        horizon = self._clock() - self._history_ttl
        while entries and (len(entries) > self._history_size or stream.bytes > self._history_max_bytes
                           or entries[0][0] <= horizon):
            stream.bytes -= replay_size(entries.popleft()[1].frame)
            self._retained -= 1

    async def publish(self, diagnosis_id: int, body: bytes, exclude_session: str | None = None) -> Publication:
        stream = self._stream(diagnosis_id)
        stream.offset += 1
        publication = Publication(diagnosis_id, stream.offset, stream.epoch,
                                  with_position(body, stream.offset, stream.epoch), exclude_session)
        if stream.entries is None:
            stream.entries = deque()
        stream.entries.append((self._clock(), publication))
        stream.bytes += replay_size(publication.frame)
        self._retained += 1
        self._trim(stream)
        self._handler(publication)
        return publication

    async def position(self, diagnosis_id: int) -> StreamPosition:
        stream = self._stream(diagnosis_id)
        return StreamPosition(stream.offset, stream.epoch)

    async def history(self, diagnosis_id: int, since: int) -> History:
        stream = self._stream(diagnosis_id)
        self._trim(stream)
        entries = stream.entries or ()
        oldest = entries[0][1].offset if entries else stream.offset + 1
        start = max(0, since - oldest + 1)
        pubs = tuple(entries[i][1] for i in range(start, len(entries)))
        return History(StreamPosition(stream.offset, stream.epoch), oldest, pubs)

    async def retained_count(self) -> int:
        for stream in self._streams.values():
            self._trim(stream)
        return self._retained

    async def cursor(self, diagnosis_id: int, user_id: int, device: str) -> Cursor | None:
        return self._cursors.get(diagnosis_id, {}).get((user_id, device))

    async def init_cursor(self, diagnosis_id: int, user_id: int, device: str, position: StreamPosition) -> Cursor:
        per = self._cursors.setdefault(diagnosis_id, {})
        cursor = per.get((user_id, device))
        if cursor is None:
            mine = [c for c in per.values() if c.user_id == user_id]
            if len(mine) >= MAX_DEVICES_PER_USER:
                stalest = min(mine, key=lambda c: c.confirmed_at)
                del per[(user_id, stalest.device)]
            cursor = per[(user_id, device)] = Cursor(user_id, device, position.offset, position.epoch, self._wall())
        return cursor

    async def confirm(self, diagnosis_id: int, user_id: int, device: str, offset: int, epoch: str) -> None:
        per = self._cursors.setdefault(diagnosis_id, {})
        cursor = per.get((user_id, device))
        if cursor is None or cursor.epoch != epoch or offset > cursor.offset:
            per[(user_id, device)] = Cursor(user_id, device, offset, epoch, self._wall())

    async def reset_cursor(self, diagnosis_id: int, user_id: int, device: str, position: StreamPosition) -> None:
        per = self._cursors.setdefault(diagnosis_id, {})
        per[(user_id, device)] = Cursor(user_id, device, position.offset, position.epoch, self._wall())

    async def cursors(self, diagnosis_id: int) -> list[Cursor]:
        return list(self._cursors.get(diagnosis_id, {}).values())

    async def push_personal(self, diagnosis_id: int, user_id: int, message_id: str, frame: bytes) -> None:
        inbox = self._inboxes.setdefault((diagnosis_id, user_id), deque(maxlen=self._inbox_size))
        inbox.append((self._clock(), message_id, frame))

    async def kept_personal(self, diagnosis_id: int, user_id: int) -> list[tuple[str, bytes]]:
        inbox = self._inboxes.get((diagnosis_id, user_id))
        if not inbox:
            return []
        horizon = self._clock() - self._history_ttl
        return [(message_id, frame) for stamp, message_id, frame in inbox if stamp > horizon]

    async def drop_personal(self, diagnosis_id: int, user_id: int, message_ids: Sequence[str]) -> None:
        inbox = self._inboxes.get((diagnosis_id, user_id))
        if inbox is None:
            return
        gone = set(message_ids)
        kept = [entry for entry in inbox if entry[1] not in gone]
        if kept:
            inbox.clear()
            inbox.extend(kept)
        else:
            del self._inboxes[(diagnosis_id, user_id)]

    def _expire_idempotency(self) -> None:
        now = self._clock()
        while self._idempotency:
            record = next(iter(self._idempotency.values()))
            if record.expires > now:
                break
            self._idempotency.popitem(last=False)

    async def reserve_idempotency(self, scope: str, key: str, fingerprint: str, token: str,
                                  lease: float) -> IdempotencyRecord | None:
        self._expire_idempotency()
        held = self._idempotency.get((scope, key))
        if held is not None and held.expires > self._clock():
            return IdempotencyRecord(held.result is not None, held.fingerprint, held.result or b"")
        while len(self._idempotency) >= MAX_IDEMPOTENCY_RECORDS:
            self._idempotency.popitem(last=False)
        self._idempotency.pop((scope, key), None)
        self._idempotency[(scope, key)] = _Reservation(self._clock() + lease, fingerprint, token)
        return None

    async def complete_idempotency(self, scope: str, key: str, token: str, result: bytes) -> None:
        held = self._idempotency.get((scope, key))
        if held is None or held.token != token:
            return
        del self._idempotency[(scope, key)]  # re-inserted last: the order stays by expiry
        held.result, held.expires = result, self._clock() + self._idempotency_ttl
        self._idempotency[(scope, key)] = held

    async def release_idempotency(self, scope: str, key: str, token: str) -> None:
        held = self._idempotency.get((scope, key))
        if held is not None and held.token == token and held.result is None:
            del self._idempotency[(scope, key)]
