"""PROTOCOL 7 over a real PostgreSQL: the ownership query, its cache, shared queries, and a replica that is down
or slow (a real server stopped, or frozen with SIGSTOP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from realtime_service.auth.replica import PostgresOwnership
from realtime_service.db.embedded import EmbeddedPostgres
from realtime_service.db.migrate import apply_migrations
from realtime_service.settings import Settings
from realtime_service.web.app import create_app
from tests.conftest import PgServer, free_port
from tests.fixtures_app import Service, StartService, make_settings
from tests.support import Client, Seeder
from tests.wsraw import handshake

# -- helpers -----------------------------------------------------------------------------------------------------


def execute(dsn: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql, params in statements:
                cur.execute(sql, params)
    finally:
        conn.close()


async def attempt(service: Service, did: int, token: str, timeout: float = 10.0) -> Client:
    """Open a connection and wait until it either gets its first frame or is closed."""
    client = await service.open(did, token, "header")
    await client.wait(lambda c: c.frames or c.closed, "a first frame or a close", timeout)
    return client


async def connect_eventually(service: Service, did: int, token: str, within: float) -> Client:
    """Retry connecting (as a client with backoff would) until `connect` arrives; fail after `within` seconds."""
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        client = await attempt(service, did, token)
        if client.frames and client.frames[0]["type"] == "connect":
            return client
        last = f"{client.close_code} {client.close_reason} {client.frames[:1]}"
        await client.close()
        await asyncio.sleep(0.2)
    raise AssertionError(f"no connect within {within}s; last attempt: {last}")


async def get_json(service: Service, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with service.http.get(f"{service.base_url}{path}", headers=headers) as resp:
        return resp.status, await resp.json()


async def post_json(service: Service, path: str, body: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {service.tokens.service()}"}
    async with service.http.post(f"{service.base_url}{path}", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def metric(service: Service, name: str) -> float:
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@dataclass
class CountingSource:
    """A real PostgresOwnership behind a proxy that counts the queries it is asked for (and can delay them)."""

    inner: PostgresOwnership
    delay: float = 0.0
    calls: dict[int, int] = field(default_factory=dict)

    async def owner_of(self, diagnosis_id: int) -> int | None:
        self.calls[diagnosis_id] = self.calls.get(diagnosis_id, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return await self.inner.owner_of(diagnosis_id)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


def counting_app(settings: Settings, delay: float = 0.0) -> tuple[Any, CountingSource]:
    dsn = settings.secret("database_url")
    assert dsn is not None
    source = CountingSource(PostgresOwnership(dsn, settings.ownership_query, settings.db_pool_min,
                                              settings.db_pool_max, settings.db_connect_timeout,
                                              settings.db_statement_timeout), delay)
    return create_app(settings, ownership_source=source), source


# -- the query ---------------------------------------------------------------------------------------------------

async def test_custom_ownership_query_over_another_table_decides(pg_server: PgServer,
                                                                 start_service: StartService) -> None:
    dsn = pg_server.create_database("ownership_custom")
    seed = Seeder(dsn)
    table_owner, diagnoses_owner = seed.user(), seed.user()
    did = seed.diagnosis(diagnoses_owner)  # the default table says someone else owns it
    only_in_cases = seed.unknown()
    execute(dsn, ("CREATE TABLE patient_cases (case_id bigint PRIMARY KEY, owner_id bigint NOT NULL)", ()),
            ("INSERT INTO patient_cases VALUES (%s, %s), (%s, %s)", (did, table_owner, only_in_cases, table_owner)))
    service = await start_service(database_url=dsn, ownership_cache_ttl=0,
                                  ownership_query="SELECT owner_id FROM patient_cases WHERE case_id = %(diagnosis_id)s")
    client = await service.connect(did, service.tokens.user(table_owner))
    assert client.frames[0]["data"]["user_id"] == table_owner
    await client.close()
    client = await service.connect(only_in_cases, service.tokens.user(table_owner))
    await client.close()
    refused = await attempt(service, did, service.tokens.user(diagnoses_owner))
    assert (refused.close_code, refused.close_reason) == (1008, "forbidden")
    missing = await attempt(service, seed.diagnosis(table_owner), service.tokens.user(table_owner))
    assert (missing.close_code, missing.close_reason) == (1008, "diagnosis_not_found")
    # REST follows the same query
    status, _ = await post_json(service, "/api/v1/publish", {"diagnosis_id": only_in_cases, "type": "x", "data": {}})
    assert status == 200


# -- the cache ---------------------------------------------------------------------------------------------------

async def test_changed_owner_is_seen_after_the_cache_ttl(start_service: StartService) -> None:
    ttl = 0.5
    service = await start_service(ownership_cache_ttl=ttl)
    old_owner, did = service.seed.owned()
    new_owner = service.seed.user()
    client = await service.connect(did, service.tokens.user(old_owner))  # caches "old_owner owns it"
    cached_at = time.monotonic()
    await client.close()
    service.seed.set_owner(did, new_owner)
    early = await attempt(service, did, service.tokens.user(new_owner))
    if time.monotonic() - cached_at < ttl * 0.8:
        assert early.close_reason == "forbidden", "the cached decision is used within the TTL"
    accepted = await connect_eventually(service, did, service.tokens.user(new_owner), within=ttl + 1.5)
    assert time.monotonic() - cached_at < ttl + 1.5
    await accepted.close()
    refused = await attempt(service, did, service.tokens.user(old_owner))
    assert (refused.close_code, refused.close_reason) == (1008, "forbidden")


async def test_a_new_diagnosis_is_seen_after_the_cache_ttl(start_service: StartService) -> None:
    ttl = 0.5
    service = await start_service(ownership_cache_ttl=ttl)
    uid = service.seed.user()
    did = service.seed.unknown()
    missing = await attempt(service, did, service.tokens.user(uid))  # caches "no such diagnosis"
    assert missing.close_reason == "diagnosis_not_found"
    cached_at = time.monotonic()
    execute(service.seed.dsn, ("INSERT INTO diagnoses (id, user_id) VALUES (%s, %s)", (did, uid)))
    accepted = await connect_eventually(service, did, service.tokens.user(uid), within=ttl + 1.5)
    assert time.monotonic() - cached_at < ttl + 1.5
    await accepted.close()


async def test_concurrent_checks_share_one_query(pg_server: PgServer, start_service: StartService) -> None:
    dsn = pg_server.create_database("ownership_single_flight")
    seed = Seeder(dsn)
    uid, did = seed.owned()
    app, source = counting_app(make_settings(dsn))
    service = await start_service(app=app)
    token = service.tokens.user(uid)
    clients = await asyncio.gather(*(service.connect(did, token, device=f"d{i}") for i in range(50)))
    assert all(c.frames[0]["type"] == "connect" for c in clients)
    assert source.calls[did] <= 2, source.calls
    # a warm cache asks nobody
    more = await asyncio.gather(*(service.connect(did, token, device=f"w{i}") for i in range(10)))
    assert source.calls[did] <= 2, source.calls
    for client in [*clients, *more]:
        await client.close()
    # publishes share too
    _, other = seed.owned()
    results = await asyncio.gather(*(service.publish(other, "burst") for _ in range(50)))
    assert sorted(r["offset"] for r in results) == list(range(1, 51))
    assert source.calls[other] <= 2, source.calls


async def test_a_client_giving_up_does_not_fail_the_others_sharing_its_query(
        pg_server: PgServer, start_service: StartService) -> None:
    """A reconnect storm: the client whose check started the shared query disconnects while it runs."""
    dsn = pg_server.create_database("ownership_give_up")
    seed = Seeder(dsn)
    uid, did = seed.owned()
    app, source = counting_app(make_settings(dsn), delay=0.5)
    service = await start_service(app=app)
    token = service.tokens.user(uid)
    quitter = await handshake(service.ws_url(did), {"Authorization": f"Bearer {token}"})
    assert quitter.status == 101

    async def started() -> bool:
        return source.calls.get(did, 0) >= 1

    await until(started, "the first check to start")
    waiter = await service.open(did, token, "header")

    async def shared() -> bool:
        return await metric(service, 'realtime_ownership_lookups_total{result="shared"}') >= 1

    await until(shared, "the second check to join the first")
    quitter.close()  # gives up while its check is in flight
    await waiter.wait(lambda c: c.frames or c.closed, "connect", timeout=5)
    assert waiter.frames, f"dropped ({waiter.close_code} {waiter.close_reason}) without a frame"
    assert waiter.frames[0]["type"] == "connect"
    await waiter.close()


async def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- a replica that is down or slow ----------------------------------------------------------------------------

@dataclass
class Replica:
    """A PostgreSQL of its own that tests may stop, start, freeze and thaw; seeded with one owned diagnosis."""

    server: EmbeddedPostgres
    dsn: str
    user_id: int
    diagnosis_id: int
    frozen: list[int] = field(default_factory=list)

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)

    async def start(self) -> None:
        if not self.server.running:
            assert await asyncio.to_thread(self.server.start) == self.dsn, "restarted on another port"

    def pids(self) -> list[int]:
        """The postmaster first, then its children (backends and auxiliary processes)."""
        text = (self.server.data_dir / "postmaster.pid").read_text()
        postmaster = int(text.splitlines()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == postmaster:
                    children.append(int(entry.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)
            self.frozen.append(pid)

    def thaw(self) -> None:
        while self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.frozen.pop(), signal.SIGCONT)


@pytest.fixture(scope="module")
def replica_server() -> Iterator[Replica]:
    workdir = Path(tempfile.mkdtemp(prefix="realtime-test-replica-"))
    workdir.chmod(0o755)  # as root, the server's system user must reach the data folder inside
    server = EmbeddedPostgres(workdir / "pgdata", port=free_port(), durable=False)
    try:
        dsn = server.start()
        apply_migrations(dsn)
        uid, did = Seeder(dsn).owned()
        yield Replica(server, dsn, uid, did)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def replica(replica_server: Replica) -> AsyncIterator[Replica]:
    """The module's replica, running and thawed before and after each test, whatever the test did."""
    replica_server.thaw()
    await replica_server.start()
    try:
        yield replica_server
    finally:
        replica_server.thaw()
        await replica_server.start()


async def assert_unavailable(service: Service, replica: Replica, within: float) -> None:
    """WebSocket 1013 ownership_unavailable (never connect), REST 503, readyz 503; the process stays up."""
    token = service.tokens.user(replica.user_id)
    started = time.monotonic()
    client = await attempt(service, replica.diagnosis_id, token, timeout=within + 5)
    elapsed = time.monotonic() - started
    assert not client.of_type("connect"), "a connection was accepted without an ownership check"
    assert (client.close_code, client.close_reason) == (1013, "ownership_unavailable")
    assert elapsed <= within, f"refused after {elapsed:.2f}s"
    started = time.monotonic()
    status, body = await post_json(service, "/api/v1/publish",
                                   {"diagnosis_id": replica.diagnosis_id, "type": "x", "data": {}})
    assert status == 503, body
    assert body["error"]["code"]
    assert time.monotonic() - started <= within
    status, body = await get_json(service, "/readyz")
    assert status == 503, body
    assert "replica" in json.dumps(body)
    status, body = await get_json(service, "/healthz")
    assert status == 200, body


async def test_replica_down_refuses_1013_then_recovers_by_itself(replica: Replica,
                                                                 start_service: StartService) -> None:
    service = await start_service(database_url=replica.dsn, ownership_cache_ttl=0, db_connect_timeout=1,
                                  db_statement_timeout=1)
    token = service.tokens.user(replica.user_id)
    client = await service.connect(replica.diagnosis_id, token)  # the pool holds a live connection now
    await client.close()
    await replica.stop()
    await assert_unavailable(service, replica, within=3.0)
    await assert_unavailable(service, replica, within=3.0)  # and again: failures are not cached, nothing hangs
    await replica.start()
    client = await connect_eventually(service, replica.diagnosis_id, token, within=10)
    await client.close()
    status, _ = await get_json(service, "/readyz")
    assert status == 200
    result = await service.publish(replica.diagnosis_id, "back")
    assert result["offset"] == 1


async def test_replica_down_from_the_start(replica: Replica, start_service: StartService) -> None:
    await replica.stop()
    service = await start_service(database_url=replica.dsn, ownership_cache_ttl=0, db_connect_timeout=1,
                                  db_statement_timeout=1)
    await assert_unavailable(service, replica, within=3.0)
    await replica.start()
    client = await connect_eventually(service, replica.diagnosis_id, service.tokens.user(replica.user_id), within=10)
    await client.close()


async def test_replica_slow_refuses_1013_within_two_seconds_then_recovers(replica: Replica,
                                                                          start_service: StartService) -> None:
    service = await start_service(database_url=replica.dsn, ownership_cache_ttl=0, db_connect_timeout=0.5,
                                  db_statement_timeout=0.5)
    token = service.tokens.user(replica.user_id)
    client = await service.connect(replica.diagnosis_id, token)
    await client.close()
    replica.freeze()
    try:
        await assert_unavailable(service, replica, within=2.0)
    finally:
        replica.thaw()
    client = await connect_eventually(service, replica.diagnosis_id, token, within=10)
    await client.close()
    status, _ = await get_json(service, "/readyz")
    assert status == 200


async def test_reconnect_storm_against_a_frozen_replica(replica: Replica, start_service: StartService) -> None:
    service = await start_service(database_url=replica.dsn, ownership_cache_ttl=0, db_connect_timeout=0.5,
                                  db_statement_timeout=0.5)
    token = service.tokens.user(replica.user_id)
    client = await service.connect(replica.diagnosis_id, token)
    await client.close()
    replica.freeze()
    try:
        started = time.monotonic()
        clients = await asyncio.gather(*(attempt(service, replica.diagnosis_id, token) for _ in range(30)))
        elapsed = time.monotonic() - started
        assert {(c.close_code, c.close_reason) for c in clients} == {(1013, "ownership_unavailable")}
        assert not any(c.of_type("connect") for c in clients)
        assert elapsed <= 3.0, f"the storm was answered after {elapsed:.2f}s"
        status, _ = await get_json(service, "/healthz")
        assert status == 200
    finally:
        replica.thaw()
    client = await connect_eventually(service, replica.diagnosis_id, token, within=10)
    await client.close()


async def test_open_connections_survive_a_replica_outage(replica: Replica, start_service: StartService) -> None:
    service = await start_service(database_url=replica.dsn, ownership_cache_ttl=0, db_connect_timeout=0.5,
                                  db_statement_timeout=0.5)
    client = await service.connect(replica.diagnosis_id, service.tokens.user(replica.user_id))
    replica.freeze()
    try:
        await assert_unavailable(service, replica, within=2.0)
        await client.send({"type": "ping"})
        await client.next_of("pong")
    finally:
        replica.thaw()
    await client.close()
