"""Presence of every node in Redis: which users each live node holds per diagnosis (PROTOCOL 5.2).

Each node owns one hash (diagnosis -> its users there) and a totals hash, and beats into a shared zset. Readers
count only nodes whose beat is recent by the Redis clock, so a node that died stops counting within the liveness
window even before its keys expire. All keys share the `{<prefix>}` hash tag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson
from redis.exceptions import RedisError

from realtime_service.broker.redis import RedisBroker
from realtime_service.cluster import NodePresence, UserPresence
from realtime_service.errors import BrokerUnavailable


class RedisPresence:
    """A `PresenceStore` on the broker's Redis."""

    def __init__(self, broker: RedisBroker, node_id: str, liveness: float) -> None:
        self._broker = broker
        self._client = broker.client
        self.node_id = node_id
        self.prefix = prefix = broker.keys.prefix
        self.nodes_key = self._nodes = f"{{{prefix}}}:nodes"
        self.liveness_ms = self._liveness_ms = int(liveness * 1000)
        self.client = self._client

    def _totals(self, node_id: str) -> str:
        return f"{{{self._broker.keys.prefix}}}:node:{node_id}"

    def _users(self, node_id: str) -> str:
        return f"{{{self._broker.keys.prefix}}}:node:{node_id}:users"

    async def run_script(self, name: str, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        return await self._run("presence", self._broker.scripts.run(name, keys, args))

    async def run(self, operation: str, coro: Any) -> Any:
        return await self._run(operation, coro)

    async def _run(self, operation: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, self._broker.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._broker.note_error(operation)
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None

    async def beat(self, connections: int) -> None:
        await self._run("presence", self._broker.scripts.run(
            "beat", (self._nodes, self._totals(self.node_id), self._users(self.node_id)),
            (self.node_id, 2 * self._liveness_ms, 20 * self._liveness_ms, connections)))

    async def write(self, changes: dict[int, UserPresence | None], connections: int) -> None:
        async def step() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for diagnosis_id, users in changes.items():
                    if users:
                        pipe.hset(self._users(self.node_id), str(diagnosis_id), orjson.dumps(
                            {str(u): [count, devices] for u, (count, devices) in users.items()}))
                    else:
                        pipe.hdel(self._users(self.node_id), str(diagnosis_id))
                pipe.hset(self._totals(self.node_id), "c", connections)
                pipe.pexpire(self._users(self.node_id), 2 * self._liveness_ms)
                pipe.pexpire(self._totals(self.node_id), 2 * self._liveness_ms)
                await pipe.execute()
        await self._run("presence", step())

    async def leave(self) -> None:
        async def step() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(self._nodes, self.node_id)
                pipe.delete(self._totals(self.node_id), self._users(self.node_id))
                await pipe.execute()
        await self._run("presence", step())

    async def _others(self) -> list[str]:
        live: list[Any] = await self._run("presence", self._broker.scripts.run(
            "live_nodes", (self._nodes,), (self._liveness_ms,)))
        return [bytes(n).decode() for n in live if bytes(n).decode() != self.node_id]

    async def users(self, diagnosis_id: int) -> list[UserPresence]:
        """Each other live node's users of one diagnosis."""
        others = await self._others()
        if not others:
            return []

        async def step() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for node_id in others:
                    pipe.hget(self._users(node_id), str(diagnosis_id))
                return list(await pipe.execute())
        return [_decode(raw) for raw in await self._run("presence", step()) if raw]

    async def nodes(self) -> list[NodePresence]:
        """Every other live node's connection total and users per diagnosis."""
        others = await self._others()
        if not others:
            return []

        async def step() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for node_id in others:
                    pipe.hget(self._totals(node_id), "c")
                    pipe.hgetall(self._users(node_id))
                return list(await pipe.execute())
        raw = await self._run("presence", step())
        out = []
        for index in range(0, len(raw), 2):
            per: dict[Any, Any] = raw[index + 1] or {}
            out.append(NodePresence(int(raw[index] or 0), {int(d): _decode(v) for d, v in per.items()}))
        return out


def _decode(raw: bytes | Iterable[int]) -> UserPresence:
    data: dict[str, Any] = orjson.loads(bytes(raw))
    return {int(user): (int(value[0]), list(value[1])) for user, value in data.items()}


class RedisConnectionCounter:
    """A `ConnectionCounter` over every live node: REALTIME_MAX_CONNECTIONS_PER_USER counts a user's connections
    wherever they are (PROTOCOL 3.11). A slot of a node that died stops counting with its beat."""

    def __init__(self, presence: RedisPresence, key_ttl: float) -> None:
        self._presence = presence
        self._ttl_ms = int(key_ttl * 1000)

    def _key(self, user_id: int) -> str:
        return f"{{{self._presence.prefix}}}:user:{user_id}:connections"

    async def acquire(self, user_id: int, session: str, limit: int) -> bool:
        taken = await self._presence.run_script(
            "user_connections", (self._key(user_id), self._presence.nodes_key),
            (f"{self._presence.node_id}|{session}", limit, self._presence.liveness_ms, self._ttl_ms))
        return bool(int(taken))

    async def release(self, user_id: int, session: str) -> None:
        try:
            await self._presence.run("presence", self._presence.client.srem(
                self._key(user_id), f"{self._presence.node_id}|{session}"))
        except BrokerUnavailable:
            pass  # the slot is dropped with this node's beat, or when the key expires
