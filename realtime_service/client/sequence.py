"""The ordering rules of a subscription (PROTOCOL 3.7, 3.8, 9), without a socket: each broadcast handed over
once and in offset order, repeated personal messages dropped by `message_id`, and a HistoryLost before the
messages that follow a `recovered: false`. The subscription feeds it frames and yields what it returns."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MESSAGE_IDS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class Position:
    """The last broadcast handed to the application: resume from here."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class HistoryLost:
    """The service could not prove nothing was missed (`recovered: false`): refetch the state from the main API.

    `offset`/`epoch` are the diagnosis's newest position at connect time; the messages that follow this item
    are the ones the service still retains in that epoch. `previous` is where the client stood (None on a first
    connection without a position).
    """

    diagnosis_id: int
    offset: int | None
    epoch: str | None
    previous: Position | None


class Resume(Exception):
    """A live frame showed a gap or another epoch: reconnect and let the resume repair it."""


def _position(offset: Any, epoch: Any) -> Position | None:
    if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0 and isinstance(epoch, str) and epoch:
        return Position(offset, epoch)
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def is_broadcast(frame: dict[str, Any]) -> bool:
    return _position(frame.get("offset"), frame.get("epoch")) is not None


Item = dict[str, Any] | HistoryLost


class Sequencer:
    """Position and repeat filter of one subscription, kept across its reconnects."""

    def __init__(self, diagnosis_id: int, position: Position | None = None) -> None:
        self.diagnosis_id = diagnosis_id
        self.position = position
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._floor: Position | None = None
        self._accept_replay = False
        self._sent_since: Position | None = None

    def connecting(self) -> Position | None:
        """A new connection is opened; returns the position to resume from (sent as since/epoch)."""
        self._sent_since = self.position
        self._floor = None
        self._accept_replay = False
        return self._sent_since

    @property
    def epoch(self) -> str | None:
        """The epoch of the live connection (from its `connect` frame)."""
        return self._floor.epoch if self._floor else None

    def feed(self, frame: dict[str, Any]) -> list[Item]:
        """One received frame -> the items to hand over, in order. Raises Resume on a gap or an epoch change."""
        kind = frame.get("type")
        if kind == "connect":
            data = _dict(frame.get("data"))
            self._floor = _position(data.get("offset"), data.get("epoch"))
            if self._sent_since is None:
                # No position: the server replays what this device has not confirmed (its delivery cursor).
                self._accept_replay = True
                if self._floor is not None:
                    self.position = self._floor
            return []
        if kind == "reconnect_messages":
            return self._replay(_dict(frame.get("data")))
        if kind in ("pong", "error", "auth", "ping"):
            return []
        if is_broadcast(frame):
            offset, epoch = frame["offset"], frame["epoch"]
            if self.position is not None:
                if epoch != self.position.epoch:
                    raise Resume("epoch_changed")
                if offset <= self.position.offset:
                    return []  # a duplicate
                if offset > self.position.offset + 1:
                    raise Resume("gap")
            self.position = Position(offset, epoch)
            return [frame]
        return [frame] if self._fresh(frame.get("message_id")) else []

    def _replay(self, data: dict[str, Any]) -> list[Item]:
        items: list[Item] = []
        if data.get("recovered") is False:
            floor = self._floor
            items.append(HistoryLost(self.diagnosis_id, floor.offset if floor else None,
                                     floor.epoch if floor else None, self._sent_since))
            self.position = None
            self._accept_replay = True
        last = -1
        messages = data.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if not isinstance(message, dict):
                continue
            if is_broadcast(message):
                offset, epoch = message["offset"], message["epoch"]
                if self._accept_replay:
                    if offset <= last:
                        continue
                    last = offset
                elif self.position is not None and epoch == self.position.epoch and offset <= self.position.offset:
                    continue
                self.position = Position(offset, epoch)
                items.append(message)
            elif self._fresh(message.get("message_id")):
                items.append(message)
        self._accept_replay = False
        floor = self._floor
        if floor is not None and (self.position is None or self.position.epoch != floor.epoch
                                  or self.position.offset < floor.offset):
            self.position = floor
        return items

    def _fresh(self, message_id: Any) -> bool:
        if not isinstance(message_id, str):
            return True
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > MESSAGE_IDS_KEPT:
            self._ids.popitem(last=False)
        return True
