"""PROTOCOL 3.11 across nodes: REALTIME_MAX_CONNECTIONS_PER_USER counts a user's connections on every node, and
the slots of a node that was SIGKILLed stop counting once its beat is gone (within 2 x heartbeat)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.cluster import Cluster, NodeSet, running_nodes, unique_prefix, wait_until
from tests.support import Client, Seeder, Tokens

HEARTBEAT = 1.0


@pytest.fixture(scope="module")
def nodes(pg_dsn: str, redis_url: str) -> Iterator[NodeSet]:
    with running_nodes(2, dsn=pg_dsn, redis_url=redis_url, prefix=unique_prefix("limits"), heartbeat=HEARTBEAT,
                       max_connections_per_user=2) as started:
        yield started


@pytest.fixture
async def cluster(nodes: NodeSet, pg_dsn: str) -> AsyncIterator[Cluster]:
    nodes.ensure_running()
    async with aiohttp.ClientSession() as http:
        cluster = Cluster(nodes, http, Tokens(), Seeder(pg_dsn))
        try:
            yield cluster
        finally:
            await cluster.close_clients()


async def test_a_users_connections_are_counted_over_every_node(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    other_did = cluster.seed.diagnosis(uid)
    token = cluster.tokens.user(uid)
    first = await cluster.connect(0, did, token, device="phone")
    await cluster.connect(1, other_did, token, device="tab")  # another diagnosis counts too: it is per user
    refused = await cluster.open(1, did, token, device="third")
    assert (await refused.wait_closed(), refused.close_reason) == (1008, "too_many_connections")
    refused_a = await cluster.open(0, did, token, device="third")
    assert (await refused_a.wait_closed(), refused_a.close_reason) == (1008, "too_many_connections")
    await first.close()
    again = await cluster.connect(1, did, token, device="third")  # the slot freed on node0 is free on node1
    assert again.frames[0]["type"] == "connect"


async def test_the_slots_of_a_killed_node_are_freed_with_its_beat(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    await cluster.connect(0, did, token, device="a")
    await cluster.connect(0, did, token, device="b")
    refused = await cluster.open(1, did, token, device="c")
    assert (await refused.wait_closed(), refused.close_reason) == (1008, "too_many_connections")
    cluster[0].kill()

    async def accepted() -> Client | None:
        client = await cluster.open(1, did, token, device="c")
        await client.wait(lambda c: c.frames or c.closed, "an answer to the connection")
        if client.frames:
            return client
        assert client.close_reason == "too_many_connections", (client.close_code, client.close_reason)
        return None

    # the dead node's beat goes stale after 1.5 heartbeats; the margin is for a busy machine
    client = await wait_until(accepted, "the killed node's slots to be freed", 2 * HEARTBEAT + 5, interval=0.2)
    assert client.frames[0]["type"] == "connect"
