"""PROTOCOL 5.2 across real nodes: three `serve` processes on one Redis, clients spread over them.

Whatever a client or the main API sees must not depend on which node it reaches: broadcasts (every node, in
order, once), exclude_session, personal messages (live, or kept and delivered once), Idempotency-Key raced on
two nodes, revoke, /ws/status and presence over every live node, and a SIGKILLed node's entries gone within
2 x heartbeat.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.cluster import (
    Cluster,
    NodeSet,
    assert_gapless,
    broadcasts,
    personal,
    running_nodes,
    sync,
    unique_prefix,
    wait_until,
)
from tests.support import Seeder, Tokens

HEARTBEAT = 1.0
NODES = 3


@pytest.fixture(scope="module")
def nodes(pg_dsn: str, redis_url: str) -> Iterator[NodeSet]:
    with running_nodes(NODES, dsn=pg_dsn, redis_url=redis_url, prefix=unique_prefix("nodes"),
                       heartbeat=HEARTBEAT, history_size=500) as started:
        yield started


@pytest.fixture
async def cluster(nodes: NodeSet, pg_dsn: str) -> AsyncIterator[Cluster]:
    nodes.ensure_running()  # a test before may have killed one
    async with aiohttp.ClientSession() as http:
        cluster = Cluster(nodes, http, Tokens(), Seeder(pg_dsn))
        try:
            yield cluster
        finally:
            await cluster.close_clients()


async def service_get(cluster: Cluster, index: int, path: str) -> Any:
    answer = await cluster.get(index, path, cluster.tokens.service())
    assert answer.status == 200, (path, answer)
    return answer.body


async def wait_presence(cluster: Cluster, did: int, expected: dict[int, int], nodes: range | list[int] | None = None,
                        timeout: float = 10.0) -> None:
    """Every listed node reports exactly `expected` ({user_id: connections}) for the diagnosis."""
    for index in (range(len(cluster)) if nodes is None else nodes):
        async def matches(index: int = index) -> bool:
            body = await service_get(cluster, index, f"/api/v1/diagnoses/{did}/presence")
            return {u["user_id"]: u["connections"] for u in body["users"]} == expected

        await wait_until(matches, f"node{index} to report presence {expected} for {did}", timeout)


# -- broadcasts -----------------------------------------------------------------------------------------------


async def test_broadcast_reaches_every_node_in_order_exactly_once(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    clients = [await cluster.connect(i % NODES, did, token, device=f"d{i}") for i in range(2 * NODES)]
    count = 60
    # Publishes race each other on every node at once: the offsets must still be one gapless order everywhere.
    answers = await asyncio.gather(*(cluster.publish(n % NODES, did, {"n": n}) for n in range(count)))
    by_offset = {a.body["offset"]: a.body for a in answers}
    assert sorted(by_offset) == list(range(1, count + 1)), sorted(by_offset)
    assert len({a.body["epoch"] for a in answers}) == 1
    sent = {a.body["offset"]: n for n, a in enumerate(answers)}
    for index, client in enumerate(clients):
        await client.wait_offset(count)
        await sync(client)
        frames = broadcasts(client)
        assert_gapless([f["offset"] for f in frames], 1, count, f"client {index} on node{index % NODES}")
        assert all(f["data"] == {"n": sent[f["offset"]]} for f in frames), f"client {index} got another body"
        assert {f["epoch"] for f in frames} == {answers[0].body["epoch"]}


async def test_exclude_session_works_whichever_node_holds_the_session(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    a, b, c = [await cluster.connect(i, did, token, device=f"d{i}") for i in range(3)]
    session = {name: client.frames[0]["data"]["session"] for name, client in zip("abc", (a, b, c), strict=True)}

    assert (await cluster.publish(2, did, {"n": 1}, exclude_session=session["a"])).body["offset"] == 1  # a on 0
    assert (await cluster.publish(0, did, {"n": 2}, exclude_session=session["b"])).body["offset"] == 2  # b on 1
    assert (await cluster.publish(1, did, {"n": 3})).body["offset"] == 3
    for client in (a, b, c):
        await client.wait_offset(3)
        await sync(client)
    assert a.offsets() == [2, 3]
    assert b.offsets() == [1, 3]
    assert c.offsets() == [1, 2, 3]
    # The excluded connection skips its echo; history still has it.
    late = await cluster.connect(2, did, token, device="late", since=0, epoch=a.frames[0]["data"]["epoch"])
    await sync(late)
    assert late.offsets() == [1, 2, 3]


# -- personal messages ----------------------------------------------------------------------------------------


async def test_personal_message_reaches_the_user_on_another_node(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    client = await cluster.connect(1, did, cluster.tokens.user(uid), device="phone")
    answer = await cluster.publish(0, did, {"note": "for you"}, type_="nudge", user_id=uid)
    assert answer.body["offset"] is None
    frame = (await client.wait(lambda c: personal(c), "the personal message from node0"))[0]
    assert frame["type"] == "nudge" and frame["data"] == {"note": "for you"}
    assert isinstance(frame["message_id"], str) and frame["message_id"]
    await sync(client)
    assert len(personal(client)) == 1


async def test_personal_message_kept_while_offline_is_delivered_once_on_another_node(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    # The user was connected on node1 and left: node0 must know nobody can take it now, and keep it.
    before = await cluster.connect(1, did, token, device="phone")
    await before.close()
    await wait_presence(cluster, did, {})
    await cluster.publish(0, did, {"n": 1})  # a broadcast, so the next connection has an offset to ack
    kept = await cluster.publish(0, did, {"note": "while away"}, type_="nudge", user_id=uid)
    assert kept.body["offset"] is None

    first = await cluster.connect(2, did, token, device="phone")
    await first.wait(lambda c: personal(c), "the kept personal message on node2")
    got = personal(first)
    assert [m["data"] for m in got] == [{"note": "while away"}]
    replay = first.of_type("reconnect_messages")
    assert len(replay) == 1 and first.frames[1] is replay[0], "kept messages come right after connect"
    await first.send({"type": "ack", "offset": first.frames[0]["data"]["offset"]})  # confirms what it received
    await sync(first)
    await first.close()
    await wait_presence(cluster, did, {})

    for index, device in ((1, "phone"), (0, "tab")):
        again = await cluster.connect(index, did, token, device=device)
        await sync(again)
        assert personal(again) == [], f"delivered twice (node{index}, {device}): {personal(again)}"
        await again.close()
        await wait_presence(cluster, did, {})


async def test_personal_message_reaches_every_connection_of_the_user_on_every_node(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    connections = [await cluster.connect(i, did, token, device=f"d{i}") for i in range(NODES)]
    await cluster.publish(1, did, {"note": "all of them"}, type_="nudge", user_id=uid)
    ids = set()
    for index, client in enumerate(connections):
        got = await client.wait(lambda c: personal(c), f"the personal message on node{index}")
        assert [m["data"] for m in got] == [{"note": "all of them"}], f"node{index}: {got}"
        ids.add(got[0]["message_id"])
    assert len(ids) == 1, "one message, one message_id, whichever node delivers it"


# -- idempotency ----------------------------------------------------------------------------------------------


async def test_idempotency_key_sent_to_two_nodes_at_once_broadcasts_once(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    watchers = [await cluster.connect(i, did, token, device=f"d{i}") for i in range(NODES)]
    rounds = 8
    for n in range(1, rounds + 1):
        key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
        first, second = (n % NODES, (n + 1) % NODES)
        a, b = await asyncio.gather(cluster.publish(first, did, {"n": n}, headers=key),
                                    cluster.publish(second, did, {"n": n}, headers=key))
        assert a.body == b.body, f"round {n}: node{first} answered {a.body}, node{second} {b.body}"
        assert a.body["offset"] == n, f"round {n}: a second broadcast was made ({a.body})"
        reused = await cluster.publish((n + 2) % NODES, did, {"n": -n}, headers=key, expect=422)
        assert reused.code == "idempotency_key_reused", reused
    for index, client in enumerate(watchers):
        await client.wait_offset(rounds)
        await sync(client)
        assert_gapless(client.offsets(), 1, rounds, f"watcher on node{index}")
        assert [f["data"]["n"] for f in broadcasts(client)] == list(range(1, rounds + 1))


async def test_idempotent_batch_sent_to_two_nodes_at_once_publishes_once(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    watcher = await cluster.connect(2, did, cluster.tokens.user(uid), device="w")
    body = {"messages": [{"diagnosis_id": did, "type": "test_event", "data": {"n": n}} for n in range(1, 4)]}
    key = {"Idempotency-Key": f"batch-{uuid.uuid4()}"}
    a, b = await asyncio.gather(cluster.post(0, "/api/v1/publish/batch", body, headers=key),
                                cluster.post(1, "/api/v1/publish/batch", body, headers=key))
    assert a.status == b.status == 200, (a, b)
    assert a.body == b.body
    assert [r["offset"] for r in a.body["results"]] == [1, 2, 3]
    assert (await cluster.publish(1, did, {"n": 4})).body["offset"] == 4, "the batch was broadcast twice"
    await watcher.wait_offset(4)
    await sync(watcher)
    assert_gapless(watcher.offsets(), 1, 4, "the watcher on node2")


# -- revoke ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("everyone", [False, True], ids=["one_user", "everyone"])
async def test_revoke_closes_the_connections_on_every_node(cluster: Cluster, everyone: bool) -> None:
    old, did = cluster.seed.owned()
    token = cluster.tokens.user(old)
    connections = [await cluster.connect(i, did, token, device=f"d{i}") for i in range(NODES)]
    new = cluster.seed.user()
    cluster.seed.set_owner(did, new)
    answer = await cluster.post(1, f"/api/v1/diagnoses/{did}/revoke", {} if everyone else {"user_id": old})
    assert answer.status == 200, answer
    for index, client in enumerate(connections):
        assert await client.wait_closed() == 1008, f"node{index}"
        assert client.close_reason == "forbidden", f"node{index}: {client.close_reason}"
    # Every node dropped its cached decision too: the new owner is let in on all of them at once.
    for index in range(NODES):
        allowed = await cluster.connect(index, did, cluster.tokens.user(new), device=f"new{index}")
        await allowed.close()


async def test_revoke_keeps_the_connections_the_replica_still_allows_on_every_node(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    connections = [await cluster.connect(i, did, token, device=f"d{i}") for i in range(NODES)]
    for body in ({}, {"user_id": uid}):
        assert (await cluster.post(2, f"/api/v1/diagnoses/{did}/revoke", body)).status == 200
    assert (await cluster.publish(0, did, {"n": 1})).body["offset"] == 1
    for index, client in enumerate(connections):
        await client.wait_offset(1)
        await sync(client)
        assert not client.closed, f"node{index} closed a connection the replica still allows"


# -- status and presence --------------------------------------------------------------------------------------


async def test_status_and_presence_count_the_connections_of_every_node(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    other_uid, other_did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    phone = await cluster.connect(0, did, token, device="phone")
    await cluster.connect(0, did, token, device="tab")
    web = await cluster.connect(1, did, token, device="web")
    await cluster.connect(2, other_did, cluster.tokens.user(other_uid))
    await cluster.publish(2, did, {"n": 1})
    await phone.wait_offset(1)

    for index in range(NODES):
        async def detail(index: int = index) -> Any:
            body = await service_get(cluster, index, "/ws/status")
            per = body.get("per_diagnosis", {})
            want = {str(did): {"connections": 3, "users": 1, "offset": 1},
                    str(other_did): {"connections": 1, "users": 1, "offset": 0}}
            return body if all(per.get(k) == v for k, v in want.items()) else None

        body = await wait_until(detail, f"node{index}'s /ws/status to count every node")
        per = body["per_diagnosis"]
        assert body["connections"] == sum(d["connections"] for d in per.values()), body
        assert body["connections"] >= 4
        totals = (await cluster.get(index, "/ws/status")).body  # without a token: the same totals, no detail
        assert "per_diagnosis" not in totals and totals["connections"] >= 4

        presence = await service_get(cluster, index, f"/api/v1/diagnoses/{did}/presence")
        assert presence["diagnosis_id"] == did
        assert [(u["user_id"], u["connections"], sorted(u["devices"])) for u in presence["users"]] == [
            (uid, 3, ["phone", "tab", "web"])], f"node{index}: {presence}"

    # `delivered` counts at least the answering node's own connections.
    assert (await cluster.publish(0, did, {"n": 2})).body["delivered"] >= 2
    await web.close()
    await wait_presence(cluster, did, {uid: 2})


async def test_a_sigkilled_nodes_connections_vanish_within_two_heartbeats(cluster: Cluster) -> None:
    uid, did = cluster.seed.owned()
    token = cluster.tokens.user(uid)
    survivor = await cluster.connect(0, did, token, device="survivor")
    doomed = [await cluster.connect(2, did, token, device=f"doomed{i}") for i in range(2)]
    await wait_presence(cluster, did, {uid: 3})

    cluster[2].kill()
    killed_at = time.monotonic()
    gone_at: dict[int, float] = {}
    for index in (0, 1):
        async def forgotten(index: int = index) -> bool:
            presence = await service_get(cluster, index, f"/api/v1/diagnoses/{did}/presence")
            status = await service_get(cluster, index, "/ws/status")
            counted = status.get("per_diagnosis", {}).get(str(did), {}).get("connections")
            return bool(presence["users"] == [{"user_id": uid, "connections": 1, "devices": ["survivor"]}]
                        and counted == 1)

        await wait_until(forgotten, f"node{index} to forget the killed node's connections", 4 * HEARTBEAT + 5,
                         interval=0.05)
        gone_at[index] = time.monotonic() - killed_at
    # Polling and a busy machine add a little; the contract is 2 x heartbeat.
    assert max(gone_at.values()) <= 2 * HEARTBEAT + 0.5, f"took {gone_at} (heartbeat {HEARTBEAT} s)"

    for client in doomed:
        await client.wait_closed()
    assert (await cluster.publish(1, did, {"n": 1})).body["offset"] == 1
    await survivor.wait_offset(1)
    assert not survivor.closed
