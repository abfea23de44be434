"""The Redis broker's live feed on one node, against a real redis-server (PROTOCOL 5.3): in order and gapless
through a killed pub/sub connection, and a new history when Redis comes back with an older copy of its data."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from realtime_service.broker.base import Publication
from realtime_service.broker.redis import RedisBroker
from realtime_service.protocol import frames

DID = 515


class Recorder:
    """What the node would see: publications in hand-over order, and interruptions."""

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self.lost: list[tuple[int, str | None]] = []
        self.changed = asyncio.Event()

    def publication(self, publication: Publication) -> None:
        self.publications.append(publication)
        self.changed.set()

    def interrupted(self, diagnosis_id: int, epoch: str | None) -> None:
        self.lost.append((diagnosis_id, epoch))
        self.changed.set()

    async def until(self, condition: object, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not condition():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def node(redis_url: str) -> AsyncIterator[tuple[RedisBroker, Recorder]]:
    broker = RedisBroker(redis_url, prefix=f"feeds-{uuid.uuid4().hex[:8]}", history_size=1000,
                         history_max_bytes=1 << 20, history_ttl=3600, inbox_size=10, idempotency_ttl=600,
                         timeout=1.0)
    seen = Recorder()
    broker.set_handler(seen.publication)
    broker.set_lost_handler(seen.interrupted)
    await broker.start()
    try:
        yield broker, seen
    finally:
        await broker.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def body(n: int) -> bytes:
    return frames.broadcast_body("n", DID, {"n": n})


async def test_a_killed_pubsub_connection_leaves_no_gap(node: tuple[RedisBroker, Recorder], raw: redis.Redis,
                                                        redis_url: str) -> None:
    broker, seen = node
    await broker.subscribe(DID)
    other = RedisBroker(redis_url, prefix=broker.keys.prefix, history_size=1000, history_max_bytes=1 << 20,
                        history_ttl=3600, inbox_size=10, idempotency_ttl=600, timeout=1.0)
    await other.start()  # another node keeps publishing while this node's link is down
    try:
        for n in range(1, 51):
            await other.publish(DID, body(n))
            if n in (10, 30):
                await raw.client_kill_filter(_type="pubsub")
        await seen.until(lambda: len(seen.publications) >= 50)
    finally:
        await other.close()
    assert [p.offset for p in seen.publications] == list(range(1, 51))
    assert seen.lost == []


async def test_offsets_going_back_start_a_new_history(node: tuple[RedisBroker, Recorder],
                                                      raw: redis.Redis) -> None:
    """An older copy of Redis's data (a restored snapshot, a lagging replica promoted): offsets 4 and 5, already
    handed out, would be given again to new messages. The node starts a new epoch and its connections resume."""
    broker, seen = node
    await broker.subscribe(DID)
    for n in range(1, 6):
        await broker.publish(DID, body(n))
    await seen.until(lambda: len(seen.publications) == 5)
    epoch = seen.publications[0].epoch
    meta, stream = broker.keys.meta(DID), broker.keys.stream(DID)
    await raw.xdel(stream, "4-0", "5-0")  # the copy was taken after offset 3
    await raw.execute_command("XSETID", stream, "3-0")
    await raw.hset(meta, "o", 3)
    again = await broker.publish(DID, body(6))  # offset 4 must not be handed out once more
    assert again.epoch != epoch and again.offset == 1  # a new history, in which the message is the first
    await seen.until(lambda: seen.lost)
    (diagnosis_id, new_epoch), = seen.lost
    assert (diagnosis_id, new_epoch) == (DID, again.epoch)
    assert (await broker.position(DID)).epoch == new_epoch
    assert [p.offset for p in seen.publications if p.epoch == epoch] == [1, 2, 3, 4, 5]


async def test_offsets_going_back_are_noticed_without_a_publish(node: tuple[RedisBroker, Recorder],
                                                                raw: redis.Redis) -> None:
    """The same older copy, with nobody publishing: the node's periodic check starts the new history."""
    broker, seen = node
    await broker.subscribe(DID)
    for n in range(1, 4):
        await broker.publish(DID, body(n))
    await seen.until(lambda: len(seen.publications) == 3)
    epoch = seen.publications[0].epoch
    await raw.xdel(broker.keys.stream(DID), "3-0")
    await raw.execute_command("XSETID", broker.keys.stream(DID), "2-0")
    await raw.hset(broker.keys.meta(DID), "o", 2)
    await seen.until(lambda: seen.lost, timeout=15)  # the check runs about every 5 s
    (diagnosis_id, new_epoch), = seen.lost
    assert diagnosis_id == DID and new_epoch not in (None, epoch)
