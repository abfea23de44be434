"""Concurrent ownership checks of different diagnoses share one replica query (issue 11), over a real PostgreSQL
and real WebSockets: each client still gets its own decision; the replica is asked a handful of times."""

from __future__ import annotations

import asyncio
import re

import pytest

from realtime_service.settings import ConfigError, load_settings
from tests.fixtures_app import Service, StartService
from tests.support import Client, Seeder


async def replica_queries(service: Service) -> float:
    """Queries the replica answered, as /metrics counts them."""
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        text = await resp.text()
    match = re.search(r'^realtime_ownership_query_seconds_count\{result="ok"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def first_answer(service: Service, did: int, token: str) -> Client:
    client = await service.open(did, token, "header")
    await client.wait(lambda c: c.frames or c.closed, "a first frame or a close", 10)
    return client


async def storm(service: Service, attempts: list[tuple[int, int]]) -> list[Client]:
    return list(await asyncio.gather(*(first_answer(service, did, service.tokens.user(uid))
                                       for did, uid in attempts)))


async def test_a_storm_of_different_diagnoses_costs_a_few_queries_and_each_client_its_own_answer(
        start_service: StartService, seed: Seeder) -> None:
    service = await start_service(ownership_batch_window=0.005)
    owned = [seed.owned() for _ in range(60)]
    stranger = seed.user()
    someone_elses = seed.diagnosis(seed.user())
    missing = seed.unknown()
    before = await replica_queries(service)
    clients = await storm(service, [(did, uid) for uid, did in owned]
                          + [(someone_elses, stranger), (missing, stranger)])
    asked = await replica_queries(service) - before
    *accepted, refused, not_found = clients
    for client, (uid, did) in zip(accepted, owned, strict=True):
        assert client.frames and client.frames[0]["type"] == "connect", (client.close_code, client.close_reason)
        assert (client.frames[0]["diagnosis_id"], client.frames[0]["data"]["user_id"]) == (did, uid)
    assert (refused.close_code, refused.close_reason) == (1008, "forbidden")
    assert (not_found.close_code, not_found.close_reason) == (1008, "diagnosis_not_found")
    assert asked <= 10, f"{asked} replica queries for 62 concurrent checks of different diagnoses"
    # the batch's answers are cached like single ones
    again = await storm(service, [(did, uid) for uid, did in owned[:10]])
    assert all(c.frames[0]["type"] == "connect" for c in again)
    assert await replica_queries(service) - before == asked
    for client in [*clients, *again]:
        await client.close()


async def test_an_empty_batch_query_asks_one_diagnosis_per_query(start_service: StartService, seed: Seeder) -> None:
    service = await start_service(ownership_batch_query="")
    owned = [seed.owned() for _ in range(12)]
    before = await replica_queries(service)
    clients = await storm(service, [(did, uid) for uid, did in owned])
    assert all(c.frames and c.frames[0]["type"] == "connect" for c in clients)
    assert await replica_queries(service) - before == 12
    for client in clients:
        await client.close()


async def test_a_custom_single_query_is_not_bypassed_by_the_default_batch_query(
        start_service: StartService, seed: Seeder) -> None:
    """The default batch query reads `diagnoses`; a deployment whose ownership lives elsewhere must not be
    answered from it: batching stays off until the operator writes the batch form of their query."""
    real_owner, table_owner = seed.user(), seed.user()
    did = seed.diagnosis(table_owner)  # `diagnoses` says table_owner; the custom query says real_owner
    query = f"SELECT {real_owner}::bigint WHERE %(diagnosis_id)s::bigint = {did}"
    service = await start_service(ownership_query=query, ownership_cache_ttl=0)
    ok, refused = await storm(service, [(did, real_owner), (did, table_owner)])
    assert ok.frames and ok.frames[0]["type"] == "connect"
    assert (refused.close_code, refused.close_reason) == (1008, "forbidden")
    await ok.close()


async def test_a_custom_batch_query_decides(start_service: StartService, seed: Seeder) -> None:
    real_owner, table_owner = seed.user(), seed.user()
    did, other = seed.diagnosis(table_owner), seed.diagnosis(table_owner)
    service = await start_service(
        ownership_query=f"SELECT {real_owner}::bigint WHERE %(diagnosis_id)s::bigint = {did}",
        ownership_batch_query=f"SELECT id, {real_owner}::bigint FROM unnest(%(diagnosis_ids)s::bigint[]) AS t(id) "
                              f"WHERE id = {did}", ownership_cache_ttl=0)
    ok, refused, missing = await storm(service, [(did, real_owner), (did, table_owner), (other, table_owner)])
    assert ok.frames and ok.frames[0]["type"] == "connect"
    assert (refused.close_code, refused.close_reason) == (1008, "forbidden")
    assert (missing.close_code, missing.close_reason) == (1008, "diagnosis_not_found")
    await ok.close()


@pytest.mark.parametrize("query", ["SELECT id, user_id FROM diagnoses WHERE id = ANY(%(diagnosis_id)s)",
                                   "SELECT id, user_id FROM diagnoses WHERE id = ANY(%s)",
                                   "SELECT id, user_id FROM diagnoses"])
def test_a_batch_query_without_its_placeholder_is_refused(query: str) -> None:
    with pytest.raises(ConfigError, match=r"REALTIME_OWNERSHIP_BATCH_QUERY.*diagnosis_ids"):
        load_settings({"REALTIME_OWNERSHIP_BATCH_QUERY": query})
