"""PROTOCOL 5.3 on real nodes: Redis stopped, paused, flushed; its pub/sub connections killed; a node SIGKILLed.

This module runs its own redis-server (with an append-only file, so history outlives a restart) because it
stops, pauses and flushes it; the session's Redis is shared with other modules and is never touched. Three
`serve` nodes with a 1 s heartbeat; clients spread over them; every received sequence is checked for gaps
and duplicates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.cluster import (
    Answer,
    Cluster,
    Follower,
    NodeSet,
    RedisProcess,
    assert_gapless,
    broadcasts,
    running_nodes,
    sync,
    unique_prefix,
    wait_until,
)
from tests.support import Client, Seeder, Tokens

HEARTBEAT = 1.0
NODES = 3


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    server = RedisProcess(appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def nodes(pg_dsn: str, redis: RedisProcess) -> Iterator[NodeSet]:
    with running_nodes(NODES, dsn=pg_dsn, redis_url=redis.url, prefix=unique_prefix("faults"),
                       heartbeat=HEARTBEAT, history_size=1000) as started:
        yield started


@pytest.fixture
async def cluster(nodes: NodeSet, redis: RedisProcess, pg_dsn: str) -> AsyncIterator[Cluster]:
    if redis.process is None:
        redis.start()
    elif redis.paused:
        redis.resume()
    nodes.ensure_running()
    async with aiohttp.ClientSession() as http:
        cluster = Cluster(nodes, http, Tokens(), Seeder(pg_dsn))
        try:
            yield cluster
        finally:
            await cluster.close_clients()


async def burst(cluster: Cluster, did: int, count: int, via: list[int], concurrency: int = 4,
                marks: dict[int, asyncio.Event] | None = None) -> list[Answer]:
    """`count` publishes round-robin over the nodes `via`, `concurrency` in flight; sets marks[k] once k answered."""
    answers: list[Answer | None] = [None] * count
    numbers = iter(range(count))
    done = 0

    async def worker() -> None:
        nonlocal done
        for n in numbers:
            answers[n] = await cluster.publish(via[n % len(via)], did, {"n": n})
            done += 1
            for threshold, event in (marks or {}).items():
                if done >= threshold:
                    event.set()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out = [a for a in answers if a is not None]
    assert sorted(a.body["offset"] for a in out) == list(range(1, count + 1))
    return out


async def wait_ready(cluster: Cluster, timeout: float = 20.0) -> None:
    for index in range(len(cluster)):
        async def ready(index: int = index) -> bool:
            try:
                return (await cluster.get(index, "/readyz")).status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, f"node{index} to be ready again", timeout, interval=0.1)


async def expect_broker_unavailable(cluster: Cluster, index: int, did: int, marker: str) -> None:
    answer = await cluster.publish(index, did, {"marker": marker}, expect=None)
    assert answer.status == 503 and answer.code == "broker_unavailable", (f"node{index}", answer)


def markers(client: Client) -> list[Any]:
    return [f["data"].get("marker") for f in broadcasts(client) if isinstance(f.get("data"), dict)
            and "marker" in f["data"]]


# -- broker down ------------------------------------------------------------------------------------------------


async def test_redis_stopped_then_started(cluster: Cluster, redis: RedisProcess) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    a = await cluster.connect(0, did, token, device="a")
    b = await cluster.connect(1, did, token, device="b")
    epoch = a.frames[0]["data"]["epoch"]
    for n in range(1, 6):
        assert (await cluster.publish(n % 2, did, {"n": n})).body["offset"] == n
    await b.wait_offset(5)

    redis.stop()
    await expect_broker_unavailable(cluster, 0, did, "lost-0")
    await expect_broker_unavailable(cluster, 1, did, "lost-1")
    batch = await cluster.post(2, "/api/v1/publish/batch", {"messages": [
        {"diagnosis_id": did, "type": "test_event", "data": {"marker": f"lost-batch-{n}"}} for n in range(3)]})
    assert batch.status == 503 and batch.code == "broker_unavailable", batch
    kept = await cluster.publish(0, did, {"marker": "lost-personal"}, type_="nudge", user_id=uid, expect=None)
    assert kept.status == 503 and kept.code == "broker_unavailable", kept

    async def not_ready() -> Any:
        answer = await cluster.get(2, "/readyz")
        return answer.status == 503 and "broker" in answer.body.get("down", [])

    await wait_until(not_ready, "/readyz to name the broker")
    refused = await cluster.open(2, did, token, device="new")
    code = await refused.wait_closed()
    assert (code, refused.close_reason) == (1013, "broker_unavailable"), (refused.frames, cluster[2].log_tail())
    # Open connections stay open and keep their heartbeat (a client that misses two PINGs would be dropped).
    await asyncio.sleep(2.5 * HEARTBEAT)
    for client in (a, b):
        await sync(client)
        assert not client.closed

    redis.start()
    await wait_ready(cluster)
    # Publish at once through every node: a node whose subscription is still reconnecting must catch up.
    for n in range(6, 12):
        answer = await cluster.publish(n % NODES, did, {"n": n})
        assert answer.body["offset"] == n and answer.body["epoch"] == epoch, answer
    for name, client in (("a", a), ("b", b)):
        await client.wait_offset(11, timeout=15)
        await sync(client)
        assert_gapless(client.offsets(), 1, 11, f"{name} across the Redis restart")
        assert markers(client) == [], f"{name} got a publish that was answered 503"
        assert not [f for f in client.frames if "message_id" in f], f"{name} got the personal message answered 503"
    resumed = await cluster.connect(2, did, token, device="resumed", since=0, epoch=epoch)
    await sync(resumed)
    replay = resumed.of_type("reconnect_messages")
    assert replay and replay[0]["data"]["recovered"] is True
    assert_gapless(resumed.offsets(), 1, 11, "history after the restart")


async def test_redis_paused_refuses_publishes_and_never_runs_them_later(cluster: Cluster,
                                                                        redis: RedisProcess) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    a = await cluster.connect(0, did, token, device="a")
    b = await cluster.connect(2, did, token, device="b")
    assert (await cluster.publish(1, did, {"n": 1})).body["offset"] == 1
    await a.wait_offset(1)

    redis.pause()
    try:
        await expect_broker_unavailable(cluster, 0, did, "paused-0")
    finally:
        redis.resume()  # Redis now runs whatever it had read: the refused publish must not take an offset
    await wait_ready(cluster)
    assert (await cluster.publish(1, did, {"n": 2})).body["offset"] == 2
    for name, client in (("a", a), ("b", b)):
        await client.wait_offset(2)
        await sync(client)
        assert_gapless(client.offsets(), 1, 2, name)
        assert markers(client) == [], f"{name} got the publish answered 503"
    history = await cluster.connect(1, did, token, device="h", since=0, epoch=a.frames[0]["data"]["epoch"])
    await sync(history)
    assert history.offsets() == [1, 2] and markers(history) == []


# -- broker lost its data ---------------------------------------------------------------------------------------


async def test_redis_flushed_starts_a_new_epoch_and_closes_open_connections(cluster: Cluster,
                                                                            redis: RedisProcess) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    a = await cluster.connect(0, did, token, device="a")
    b = await cluster.connect(1, did, token, device="b")
    old_epoch = a.frames[0]["data"]["epoch"]
    for n in range(1, 4):
        await cluster.publish(n % NODES, did, {"n": n})
    await a.wait_offset(3)
    await b.wait_offset(3)

    assert redis.command("FLUSHALL") == "OK"
    answer = await cluster.publish(2, did, {"n": "after"})
    new_epoch = answer.body["epoch"]
    assert new_epoch != old_epoch and answer.body["offset"] == 1, answer
    for name, client in (("a", a), ("b", b)):
        assert await client.wait_closed(timeout=15) == 1012, name
        assert client.close_reason == "service_restart", (name, client.close_reason)
        assert all(f["epoch"] == old_epoch for f in broadcasts(client)), f"{name} mixed two epochs"

    resumed = await cluster.connect(1, did, token, device="a", since=3, epoch=old_epoch)
    await sync(resumed)
    assert resumed.frames[0]["data"]["epoch"] == new_epoch
    replay = resumed.of_type("reconnect_messages")
    assert replay, "a resume into a lost history must say so"
    assert replay[0]["data"]["recovered"] is False
    assert [(m["offset"], m["epoch"]) for m in replay[0]["data"]["messages"]] == [(1, new_epoch)]
    # A device that resumes by its cursor alone (no since) lost its cursor with the data: like a device's first
    # connection it starts at the newest offset, and its connect frame names the new epoch, which is how such a
    # client can tell that history was lost.
    by_cursor = await cluster.connect(2, did, token, device="b")
    await sync(by_cursor)
    assert by_cursor.frames[0]["data"]["epoch"] == new_epoch
    assert by_cursor.frames[0]["data"]["offset"] == 1


async def test_redis_back_with_an_older_copy_of_its_data_starts_a_new_epoch(pg_dsn: str) -> None:
    """A restored snapshot (or a failover to a replica that was behind) brings history back in time: offsets
    already handed out would be given again, and clients that had them would skip the new messages. History that
    went back is history lost: a new epoch, open connections closed 1012, resumes answer recovered: false."""
    own = RedisProcess(appendonly=False)  # its own Redis: this one is killed and brought back older
    own.start()
    try:
        with running_nodes(2, dsn=pg_dsn, redis_url=own.url, prefix=unique_prefix("older"),
                           heartbeat=HEARTBEAT) as pair:
            async with aiohttp.ClientSession() as http:
                cluster = Cluster(pair, http, Tokens(), Seeder(pg_dsn))
                try:
                    await _older_copy(cluster, own)
                finally:
                    await cluster.close_clients()
    finally:
        own.close()


async def _older_copy(cluster: Cluster, own: RedisProcess) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    a = await cluster.connect(0, did, token, device="a")
    b = await cluster.connect(1, did, token, device="b")
    old_epoch = a.frames[0]["data"]["epoch"]
    for n in range(1, 6):
        await cluster.publish(n % 2, did, {"n": n})
    assert own.command("SAVE") == "OK"  # the snapshot holds offsets 1..5
    for n in range(6, 9):
        await cluster.publish(n % 2, did, {"n": n})
    for client in (a, b):
        await client.wait_offset(8)
    own.kill()
    own.start()  # loads the snapshot: offset 5 is the newest again, in the same epoch
    cluster.nodes.ensure_running()

    answer = await cluster.publish(1, did, {"n": 9})
    new_epoch = answer.body["epoch"]
    assert new_epoch != old_epoch, f"offsets went back within one epoch: {answer.body}"
    for name, client in (("a", a), ("b", b)):
        assert await client.wait_closed(timeout=15) == 1012, name
        assert client.close_reason == "service_restart", (name, client.close_reason)
        old = [(f["offset"], f["data"]["n"]) for f in broadcasts(client) if f["epoch"] == old_epoch]
        assert old == [(n, n) for n in range(1, 9)], f"{name} got another message under an offset it had: {old}"
        assert all(f["epoch"] == old_epoch for f in broadcasts(client)), f"{name} mixed two epochs"
    resumed = await cluster.connect(0, did, token, device="a", since=8, epoch=old_epoch)
    await sync(resumed)
    replay = resumed.of_type("reconnect_messages")
    assert replay and replay[0]["data"]["recovered"] is False, resumed.frames
    assert [m["data"] for m in replay[0]["data"]["messages"]][-1] == {"n": 9}
    assert {m["epoch"] for m in replay[0]["data"]["messages"]} == {new_epoch}


# -- lost pub/sub -----------------------------------------------------------------------------------------------


async def test_pubsub_connections_killed_mid_burst_leave_no_gap(cluster: Cluster, redis: RedisProcess) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    clients = [await cluster.connect(i % NODES, did, token, device=f"d{i}") for i in range(2 * NODES)]
    count = 300
    marks = {100: asyncio.Event(), 200: asyncio.Event()}
    task = asyncio.create_task(burst(cluster, did, count, list(range(NODES)), marks=marks))
    killed = []
    for mark in marks.values():
        await asyncio.wait_for(mark.wait(), 60)
        killed.append(redis.command("CLIENT", "KILL", "TYPE", "pubsub"))
    await asyncio.wait_for(task, 60)
    assert killed[0] >= 1, "no pub/sub connection to kill: the nodes were not subscribed"
    for index, client in enumerate(clients):
        await client.wait_offset(count, timeout=20)
        await sync(client)
        assert not client.closed, f"client {index} closed {client.close_code} {client.close_reason}"
        assert_gapless(client.offsets(), 1, count, f"client {index} on node{index % NODES}")


# -- a node killed ----------------------------------------------------------------------------------------------


async def test_node_sigkilled_mid_burst_its_clients_resume_elsewhere_missing_nothing(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    watcher = await cluster.connect(0, did, token, device="watcher")
    by_since = Follower(cluster, did, token, "since-device", mode="since")
    by_cursor = Follower(cluster, did, token, "cursor-device", mode="cursor")
    for follower in (by_since, by_cursor):
        await follower.connect(2)
    count = 200
    mark = asyncio.Event()
    task = asyncio.create_task(burst(cluster, did, count, [0, 1], concurrency=3, marks={70: mark}))
    await asyncio.wait_for(mark.wait(), 60)
    cluster[2].kill()
    for follower, index in ((by_since, 0), (by_cursor, 1)):
        assert follower.client is not None
        await follower.client.wait_closed()
        follower.harvest()
        await follower.connect(index)
    await asyncio.wait_for(task, 60)

    for follower in (by_since, by_cursor):
        assert follower.client is not None
        await follower.client.wait(lambda c: count in [f["offset"] for f in broadcasts(c)],
                                   f"{follower.device} to reach offset {count}", timeout=20)
        await sync(follower.client)
        follower.harvest()
        assert follower.recovered and all(follower.recovered), (follower.device, follower.recovered)
    # With since/epoch: nothing missed, nothing twice.
    assert_gapless(by_since.offsets, 1, count, "the since/epoch client over two nodes")
    # With the device cursor: nothing missed; frames written but never confirmed may come again (PROTOCOL 3.7),
    # each connection in order.
    assert set(by_cursor.offsets) == set(range(1, count + 1)), sorted(set(range(1, count + 1))
                                                                      - set(by_cursor.offsets))[:20]
    for _, client in by_cursor.connections:
        got = [f["offset"] for f in broadcasts(client)]
        assert_gapless(got, got[0], got[-1], "one connection of the cursor client")
    await sync(watcher)
    assert_gapless(watcher.offsets(), 1, count, "the watcher on a surviving node")
