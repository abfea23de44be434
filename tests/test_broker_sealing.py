"""Encryption at rest (PROTOCOL 5.1): with REALTIME_BROKER_ENCRYPTION_KEYS, Redis never holds or relays a message
body in the clear, an entry only opens where it belongs, and keys rotate without losing what the new set opens.

Run against a real redis-server: every key of the test's prefix is read back whole, and MONITOR watches the
commands (scripts' inner PUBLISH included) while messages go through.
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

from realtime_service.broker.base import Publication
from realtime_service.broker.redis import RedisBroker
from realtime_service.broker.sealing import Sealer, SealError, history_aad
from realtime_service.protocol import frames
from realtime_service.settings import ConfigError, load_settings

MARKER = "patient-7741-allergic-to-penicillin"
DID = 4242


def key_setting(*kids: str) -> str:
    return ",".join(f"{kid}:{base64.b64encode(KEYS[kid]).decode()}" for kid in kids)


KEYS = {"old": os.urandom(32), "new": os.urandom(32)}


def build(url: str, prefix: str, keys: str | None, events: list[tuple[str, str]] | None = None) -> RedisBroker:
    return RedisBroker(url, prefix=prefix, history_size=50, history_max_bytes=1 << 20, history_ttl=3600,
                       inbox_size=10, idempotency_ttl=600, timeout=2.0,
                       events=(lambda e, d: events.append((e, d))) if events is not None else None,
                       sealer=Sealer.parse(keys) if keys else None)


@pytest.fixture
def prefix() -> str:
    return f"seal-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def dump_everything(client: redis.Redis, prefix: str) -> bytes:
    """Every value of every key the broker wrote under this prefix, concatenated."""
    out: list[bytes] = []
    async for key in client.scan_iter(match=f"*{prefix}*", count=1000):
        kind = (await client.type(key)).decode()
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1)
        elif kind == "stream":
            value = await client.xrange(key)
        else:
            value = await client.dump(key)
        out.append(key + b"=" + repr(value).encode())
    return b"\n".join(out)


async def test_no_message_body_in_redis_or_on_the_wire_to_it(redis_url: str, raw: redis.Redis, prefix: str) -> None:
    broker = build(redis_url, prefix, key_setting("new"))
    received: list[Publication] = []
    broker.set_handler(received.append)
    await broker.start()
    monitor_lines: list[str] = []
    monitor_client = redis.Redis.from_url(redis_url)
    ready, ended = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        async with monitor_client.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                line = str(command.get("command", ""))
                monitor_lines.append(line)
                if "sentinel" in line:
                    ended.set()
    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await broker.subscribe(DID)
        body = frames.broadcast_body("note", DID, {"text": MARKER})
        publication = await broker.publish(DID, body)
        assert MARKER.encode() in publication.frame  # the node itself works with the clear frame
        assert [p.frame for p in received] == [publication.frame]
        await broker.push_personal(DID, 7, "m7", frames.personal_frame("dm", DID, 7, {"text": MARKER}))
        await broker.publish_personal(DID, 8, None, "m8", frames.personal_frame("dm", DID, 8, {"text": MARKER}),
                                      "other")
        assert await broker.reserve_idempotency("svc", "k", "fp", "me", 15) is None
        await broker.complete_idempotency("svc", "k", "me", b'{"echo":"%s"}' % MARKER.encode())
        history = await broker.history(DID, 0)
        assert [p.frame for p in history.publications] == [publication.frame]
        assert MARKER.encode() in (await broker.kept_personal(DID, 7))[0][1]
        held = await broker.reserve_idempotency("svc", "k", "fp", "other", 15)
        assert held is not None and MARKER.encode() in held.result
        await broker.push_personal(DID, 9, "m9", frames.personal_frame("dm", DID, 9, {"text": MARKER}))
        await raw.set(f"{prefix}-sentinel", "end")  # the last command MONITOR must have seen
        await asyncio.wait_for(ended.wait(), 10)
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        await monitor_client.aclose()
        await broker.close()
    stored = await dump_everything(raw, prefix)
    assert stored, "the broker wrote nothing under its prefix"
    assert MARKER.encode() not in stored
    assert not [line for line in monitor_lines if MARKER in line], "a message body crossed to Redis in the clear"
    assert any("EVALSHA" in line for line in monitor_lines)  # MONITOR did see the publishes


async def test_without_keys_bodies_are_stored_in_the_clear(redis_url: str, raw: redis.Redis, prefix: str) -> None:
    """The check above can fail: the same steps without keys leave the marker in Redis."""
    broker = build(redis_url, prefix, None)
    await broker.start()
    try:
        await broker.publish(DID, frames.broadcast_body("note", DID, {"text": MARKER}))
    finally:
        await broker.close()
    assert MARKER.encode() in await dump_everything(raw, prefix)


def test_an_entry_only_opens_where_it_belongs() -> None:
    sealer = Sealer.parse(key_setting("new"))
    sealed = sealer.seal(b"secret", history_aad(1, 5))
    assert sealer.open(sealed, history_aad(1, 5)) == b"secret"
    for elsewhere in (history_aad(2, 5), history_aad(1, 6)):
        with pytest.raises(SealError):
            sealer.open(sealed, elsewhere)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        sealer.open(tampered, history_aad(1, 5))


async def test_rotation_keeps_what_the_new_set_opens_and_drops_the_rest_counted(redis_url: str, prefix: str) -> None:
    first = build(redis_url, prefix, key_setting("old"))
    await first.start()
    try:
        await first.publish(DID, frames.broadcast_body("note", DID, {"n": 1}))
    finally:
        await first.close()
    rotated = build(redis_url, prefix, key_setting("new", "old"))  # new key first: it seals, both open
    await rotated.start()
    try:
        assert [p.offset for p in (await rotated.history(DID, 0)).publications] == [1]
        await rotated.publish(DID, frames.broadcast_body("note", DID, {"n": 2}))
    finally:
        await rotated.close()
    events: list[tuple[str, str]] = []
    retired = build(redis_url, prefix, key_setting("new"), events)  # the old key is gone
    await retired.start()
    try:
        history = await retired.history(DID, 0)
        assert [p.offset for p in history.publications] == [2]  # offset 1 no longer opens: dropped, never sent
        assert ("error", "unseal") in events
    finally:
        await retired.close()


async def test_sealed_publishes_from_two_nodes_stay_gapless(redis_url: str, prefix: str) -> None:
    """Each sealed body names its offset; racing nodes seal again for the next free one, and nothing is lost."""
    a, b = build(redis_url, prefix, key_setting("new")), build(redis_url, prefix, key_setting("new"))
    seen: list[Publication] = []
    all_seen = asyncio.Event()

    def on_publication(publication: Publication) -> None:
        seen.append(publication)
        if len(seen) == 30:
            all_seen.set()
    b.set_handler(on_publication)
    await a.start()
    await b.start()
    try:
        await b.subscribe(DID)
        results = await asyncio.gather(*(node.publish(DID, frames.broadcast_body("n", DID, {"i": i}))
                                         for i, node in enumerate([a, b] * 15)))
        assert sorted(p.offset for p in results) == list(range(1, 31))
        await asyncio.wait_for(all_seen.wait(), 10)
        assert [p.offset for p in seen] == list(range(1, 31))
        assert len((await a.history(DID, 0)).publications) == 30
    finally:
        await a.close()
        await b.close()


def test_bad_keys_are_refused_at_start_naming_the_setting_not_the_key() -> None:
    short = base64.b64encode(b"x" * 16).decode()
    for value in (f"k1:{short}", "k1", "k1:not-base64!", f"{key_setting('new')},new:{short}"):
        with pytest.raises(ConfigError) as refused:
            load_settings({"REALTIME_BROKER_ENCRYPTION_KEYS": value})
        assert "broker_encryption_keys" in str(refused.value).lower()
        assert short not in str(refused.value) and "not-base64" not in str(refused.value)
