"""What nodes tell each other: presence (who is connected where) and control messages (revoke).

One node alone answers from its hub (`LocalCluster`). With a shared store (Redis), `SharedCluster` writes this
node's presence shortly after it changes, beats so that other nodes know it lives, and merges every live node's
entries when asked; this node's own part always comes from its hub, so it is never stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from realtime_service.errors import BrokerUnavailable
from realtime_service.hub import Hub

log = logging.getLogger("realtime.cluster")

UserPresence = dict[int, tuple[int, list[str]]]  # user id -> (connections, devices)
FLUSH_DELAY = 0.02  # seconds: presence changes of one burst of connects go out in one write


@dataclass(frozen=True, slots=True)
class NodePresence:
    """One other node's part: its connection total and its users per diagnosis."""

    connections: int
    diagnoses: dict[int, UserPresence] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Revoke:
    """A revoke decided by one node, applied by all (PROTOCOL 5.2): the owner found, None if the diagnosis is
    gone, or `unavailable` when the replica did not answer (then the targets close to be checked afresh)."""

    origin: str
    diagnosis_id: int
    user_id: int | None
    owner: int | None
    unavailable: bool = False

    def encode(self) -> bytes:
        return orjson.dumps({"op": "revoke", "origin": self.origin, "diagnosis_id": self.diagnosis_id,
                             "user_id": self.user_id, "owner": self.owner, "unavailable": self.unavailable})


def decode_control(message: bytes) -> Revoke | None:
    """A control message of another node; None if it is not one this version knows."""
    try:
        data = orjson.loads(message)
        if data.get("op") != "revoke":
            return None
        return Revoke(str(data["origin"]), int(data["diagnosis_id"]),
                      None if data["user_id"] is None else int(data["user_id"]),
                      None if data["owner"] is None else int(data["owner"]), bool(data.get("unavailable")))
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("an unknown control message was dropped")
        return None


def local_users(hub: Hub, diagnosis_id: int) -> UserPresence:
    users: UserPresence = {}
    for conn in hub.connections(diagnosis_id):
        count, devices = users.get(conn.user_id, (0, []))
        if conn.device not in devices:
            devices = [*devices, conn.device]
        users[conn.user_id] = (count + 1, devices)
    return users


class PresenceStore(Protocol):
    """Where nodes keep their presence (Redis); reads leave this node out."""

    node_id: str

    async def beat(self, connections: int) -> None: ...

    async def write(self, changes: dict[int, UserPresence | None], connections: int) -> None: ...

    async def leave(self) -> None: ...

    async def users(self, diagnosis_id: int) -> list[UserPresence]: ...

    async def nodes(self) -> list[NodePresence]: ...


class Cluster(Protocol):
    node_id: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def changed(self, diagnosis_id: int) -> None:
        """This node's connections of a diagnosis changed (written soon, not awaited: for departures)."""

    async def joined(self, diagnosis_id: int) -> None:
        """A connection joined: returns once other nodes can see it, so that a personal message published after
        its `connect` frame finds it (connections joining together share one write)."""

    async def users(self, diagnosis_id: int) -> UserPresence:
        """Users connected to a diagnosis on every live node."""

    async def totals(self) -> tuple[int, set[int], dict[int, UserPresence]]:
        """(connections, diagnoses with connections, users per diagnosis) over every live node."""

    async def user_elsewhere(self, diagnosis_id: int, user_id: int) -> bool:
        """Whether another live node holds a connection of this user to this diagnosis."""


class LocalCluster:
    """A cluster of one."""

    def __init__(self, hub: Hub, node_id: str) -> None:
        self._hub = hub
        self.node_id = node_id

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def changed(self, diagnosis_id: int) -> None:
        return None

    async def joined(self, diagnosis_id: int) -> None:
        return None

    async def users(self, diagnosis_id: int) -> UserPresence:
        return local_users(self._hub, diagnosis_id)

    async def totals(self) -> tuple[int, set[int], dict[int, UserPresence]]:
        diagnoses = self._hub.diagnoses()
        return self._hub.count, set(diagnoses), {d: local_users(self._hub, d) for d in diagnoses}

    async def user_elsewhere(self, diagnosis_id: int, user_id: int) -> bool:
        return False


def _merge(into: UserPresence, part: UserPresence) -> None:
    for user, (count, devices) in part.items():
        have_count, have_devices = into.get(user, (0, []))
        into[user] = (have_count + count, have_devices + [d for d in devices if d not in have_devices])


class SharedCluster:
    """Presence shared through a store, with this node's own part read from its hub."""

    def __init__(self, hub: Hub, store: PresenceStore, beat_every: float,
                 on_error: Callable[[], None] | None = None) -> None:
        self._hub = hub
        self._store = store
        self.node_id = store.node_id
        self._beat_every = beat_every
        self._dirty: set[int] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._on_error = on_error or (lambda: None)

    async def start(self) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self._store.beat(self._hub.count)
        self._beater = asyncio.create_task(self._beat_forever())

    async def close(self) -> None:
        for task in (self._beater, self._writing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._flush is not None:
            self._flush.cancel()
        try:
            await self._store.leave()  # vanish at once, not after the liveness window
        except BrokerUnavailable:
            log.warning("could not remove this node's presence; it expires on its own")

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._beat_every)
            try:
                if self._dirty:
                    await self._write()
                await self._store.beat(self._hub.count)
            except BrokerUnavailable:
                self._on_error()

    def changed(self, diagnosis_id: int) -> None:
        self._dirty.add(diagnosis_id)
        self._kick(FLUSH_DELAY)

    async def joined(self, diagnosis_id: int) -> None:
        self._dirty.add(diagnosis_id)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._flush is not None:  # a departure's delayed write is pending: do it now, with this one
            self._flush.cancel()
            self._flush = None
        self._kick(0)
        await waiter

    def _kick(self, delay: float) -> None:
        if self._writing is None and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(delay, self._start_write)

    def _start_write(self) -> None:
        self._flush = None
        self._writing = asyncio.create_task(self._write_logged())

    async def _write_logged(self) -> None:
        waiters, self._waiters = self._waiters, []  # who joins during this write waits for the next one
        try:
            await self._write()
        except BrokerUnavailable as exc:
            self._on_error()  # kept dirty: the next write or beat retries
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        finally:
            self._writing = None
            if self._waiters:
                self._kick(0)
            elif self._dirty:
                self._kick(FLUSH_DELAY)

    async def _write(self) -> None:
        dirty, self._dirty = self._dirty, set()
        changes: dict[int, UserPresence | None] = {d: local_users(self._hub, d) or None for d in dirty}
        try:
            await self._store.write(changes, self._hub.count)
        except BrokerUnavailable:
            self._dirty |= dirty
            raise

    async def users(self, diagnosis_id: int) -> UserPresence:
        merged = local_users(self._hub, diagnosis_id)
        for part in await self._store.users(diagnosis_id):
            _merge(merged, part)
        return merged

    async def totals(self) -> tuple[int, set[int], dict[int, UserPresence]]:
        diagnoses = set(self._hub.diagnoses())
        per: dict[int, UserPresence] = {d: local_users(self._hub, d) for d in diagnoses}
        connections = self._hub.count
        for node in await self._store.nodes():
            connections += node.connections
            for diagnosis_id, users in node.diagnoses.items():
                diagnoses.add(diagnosis_id)
                _merge(per.setdefault(diagnosis_id, {}), users)
        return connections, diagnoses, per

    async def user_elsewhere(self, diagnosis_id: int, user_id: int) -> bool:
        return any(user_id in part for part in await self._store.users(diagnosis_id))
