"""Issue 9 at the WebSocket edge: 1009 labelled right (finding 11), heartbeat drops freed at once, a client
stopped with SIGSTOP found and freed, connection limits (PROTOCOL 3.11) and the access audit log."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from realtime_service.limits import (
    ConnectRateLimiter,
    LocalConnectionCounter,
    client_address,
    parse_networks,
    rate_key,
)
from realtime_service.logs import JsonFormatter
from realtime_service.web.state import STATE
from tests.fixtures_app import Service, StartService
from tests.support import Client
from tests.test_metrics import Scrape, scrape, scrape_until
from tests.wsraw import handshake


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status_connections(service: Service) -> int:
    async with service.http.get(f"{service.base_url}/ws/status") as resp:
        return int((await resp.json())["connections"])


async def presence(service: Service, did: int) -> list[dict[str, Any]]:
    async with service.http.get(f"{service.base_url}/api/v1/diagnoses/{did}/presence",
                                headers=auth(service.tokens.service())) as resp:
        users: list[dict[str, Any]] = (await resp.json())["users"]
        return users


async def hub_count(service: Service, count: int, timeout: float = 5.0) -> None:
    """Wait until the node holds `count` connections (admission finishes after the 101 is sent)."""
    deadline = time.monotonic() + timeout
    while service.node.hub.count != count:
        assert time.monotonic() < deadline, f"{service.node.hub.count} connections, expected {count}"
        await asyncio.sleep(0.01)


# -- finding 11: a 1009 is message_too_big ------------------------------------------------------------------------

async def test_an_oversized_frame_after_auth_counts_as_message_too_big(start_service: StartService) -> None:
    service = await start_service(max_frame_bytes=128)
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    await client.ws.send_str(json.dumps({"type": "ping", "pad": "x" * 1000}))
    assert await client.wait_closed() == 1009
    after = await scrape_until(service, lambda s: s.value("realtime_disconnects_total", reason="message_too_big")
                               + s.value("realtime_disconnects_total", reason="client") >= 1, "the disconnect")
    assert after.value("realtime_disconnects_total", reason="message_too_big") == 1
    assert after.value("realtime_disconnects_total", reason="client") == 0


async def test_an_oversized_first_frame_counts_as_message_too_big(start_service: StartService) -> None:
    service = await start_service(max_frame_bytes=128)
    _, did = service.seed.owned()
    client = await service.open(did, None)
    await client.ws.send_str(json.dumps({"type": "auth", "token": "x" * 1000}))
    assert await client.wait_closed() == 1009
    after = await scrape_until(service, lambda s: s.value("realtime_connection_attempts_total",
                                                          outcome="message_too_big") >= 1, "the refused attempt")
    assert after.value("realtime_connection_attempts_total", outcome="closed") == 0


# -- heartbeat drops free at once -----------------------------------------------------------------------------------

async def test_a_heartbeat_drop_leaves_hub_presence_and_status_at_once(start_service: StartService) -> None:
    """A client that never reads never answers the close handshake either: counting it until the handshake timed
    out kept it in presence and /ws/status for 2 s after the drop."""
    service = await start_service(heartbeat=0.4)
    uid, did = service.seed.owned()
    silent = await handshake(service.ws_url(did), auth(service.tokens.user(uid)))  # never reads, never pongs
    assert silent.status == 101
    try:
        await hub_count(service, 1)
        assert await status_connections(service) == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            metrics: Scrape = await scrape(service)
            if metrics.value("realtime_disconnects_total", reason="heartbeat_timeout") >= 1:
                break
            assert loop.time() < deadline, "the silent client was never dropped"
            await asyncio.sleep(0.01)
        dropped_at = loop.time()
        while service.node.hub.count:
            assert loop.time() - dropped_at < 0.3, "still counted after the heartbeat dropped it"
            await asyncio.sleep(0.005)
        assert await status_connections(service) == 0
        assert await presence(service, did) == []
    finally:
        silent.close()


STOPPABLE_CLIENT = """
import asyncio, os, sys
import aiohttp

async def main() -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["RT_TOKEN"]},
                                   autoping=True) as ws:
            await ws.receive()
            print("connected", flush=True)
            async for _ in ws:
                pass
    print("closed", flush=True)

asyncio.run(main())
"""


async def test_a_client_stopped_with_sigstop_is_found_by_the_heartbeat_and_freed(start_service: StartService,
                                                                                   tmp_path: Path) -> None:
    """No FIN ever comes from a stopped process: only the heartbeat can find it. Before it stops it answers every
    PING, so the heartbeat keeps it; once stopped it is freed within 2 x heartbeat."""
    heartbeat = 0.5
    service = await start_service(heartbeat=heartbeat)
    uid, did = service.seed.owned()
    script = tmp_path / "client.py"
    script.write_text(STOPPABLE_CLIENT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), service.ws_url(did, device="stopped"),
        env={**os.environ, "RT_TOKEN": service.tokens.user(uid)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"connected", line
        await asyncio.sleep(3 * heartbeat)  # several PINGs answered: a live client is kept
        assert await status_connections(service) == 1
        users = await presence(service, did)
        assert [u["user_id"] for u in users] == [uid]
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while service.node.hub.count:
            assert time.monotonic() - stopped < 2 * heartbeat + 1.0, "the stopped client is still counted"
            await asyncio.sleep(0.02)
        assert await status_connections(service) == 0
        assert await presence(service, did) == []
        after = await scrape(service)
        assert after.value("realtime_disconnects_total", reason="heartbeat_timeout") == 1
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# -- connection limits (PROTOCOL 3.11) -------------------------------------------------------------------------------

async def test_a_full_node_answers_503_with_retry_after_before_the_upgrade(start_service: StartService) -> None:
    service = await start_service(max_connections=2)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    first = await service.connect(did, token)
    second = await service.connect(did, token)
    refused = await handshake(service.ws_url(did), auth(token))
    refused.close()
    assert refused.status == 503
    assert "sec-websocket-accept" not in refused.headers
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert json.loads(refused.body)["error"]["code"] == "node_full"
    await first.close()
    edge = service.app[STATE].edge
    deadline = time.monotonic() + 5
    while edge.websockets != 1:  # the handler of the closed one has returned
        assert time.monotonic() < deadline, edge.websockets
        await asyncio.sleep(0.01)
    third = await service.connect(did, token)
    await third.close()
    await second.close()


async def test_connect_rate_per_address_answers_429_before_any_token_work(start_service: StartService) -> None:
    service = await start_service(connect_rate=0.5, connect_burst=2)
    uid, did = service.seed.owned()
    before = await scrape(service)
    answers = []
    for _ in range(2):  # the burst: bad tokens, refused after the upgrade as usual
        answer = await handshake(service.ws_url(did), auth("not-a-token"))
        answer.close()
        answers.append(answer.status)
    assert answers == [101, 101]
    limited = await handshake(service.ws_url(did), auth(service.tokens.user(uid)))
    limited.close()
    assert limited.status == 429
    assert int(limited.headers["retry-after"]) == 2  # 1 / 0.5 per second
    assert json.loads(limited.body)["error"]["code"] == "connect_rate_limited"
    after = await scrape(service)
    lookups = sum(after.value("realtime_ownership_lookups_total", result=r) for r in ("hit", "shared", "miss"))
    lookups_before = sum(before.value("realtime_ownership_lookups_total", result=r) for r in ("hit", "shared", "miss"))
    assert lookups == lookups_before, "the replica was asked about a refused attempt"
    assert after.value("realtime_connection_attempts_total", outcome="connect_rate_limited") == 1


async def test_forwarded_for_counts_only_behind_a_trusted_proxy(start_service: StartService) -> None:
    service = await start_service(connect_rate=0.1, connect_burst=1, trusted_proxies=("127.0.0.0/8",))
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)

    async def status(forwarded: str) -> int:
        answer = await handshake(service.ws_url(did), {**auth(token), "X-Forwarded-For": forwarded})
        answer.close()
        return answer.status

    assert await status("203.0.113.5") == 101
    assert await status("203.0.113.5") == 429
    assert await status("198.51.100.7, 203.0.113.6") == 101  # another client; the left entry is the client's own
    assert await status("203.0.113.5, 203.0.113.6") == 429  # a spoofed left entry changes nothing
    await hub_count(service, 0)


async def test_forwarded_for_is_ignored_without_trusted_proxies(start_service: StartService) -> None:
    service = await start_service(connect_rate=0.1, connect_burst=1)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    first = await handshake(service.ws_url(did), {**auth(token), "X-Forwarded-For": "203.0.113.5"})
    second = await handshake(service.ws_url(did), {**auth(token), "X-Forwarded-For": "203.0.113.99"})
    first.close()
    second.close()
    assert (first.status, second.status) == (101, 429)


async def test_a_users_connection_over_the_limit_is_closed_too_many_connections(start_service: StartService) -> None:
    service = await start_service(max_connections_per_user=2)
    uid = service.seed.user()
    dids = [service.seed.diagnosis(uid) for _ in range(3)]
    token = service.tokens.user(uid)
    first = await service.connect(dids[0], token)
    second = await service.connect(dids[1], token, device="tablet")
    over = await service.open(dids[2], token)
    assert await over.wait_closed() == 1008
    assert over.close_reason == "too_many_connections"
    other_uid, other_did = service.seed.owned()  # another user is not affected
    other = await service.connect(other_did, service.tokens.user(other_uid))
    await first.close()
    await hub_count(service, 2)
    again = await service.connect(dids[2], token)
    for client in (again, second, other):
        await client.close()
    after = await scrape(service)
    assert after.value("realtime_connection_attempts_total", outcome="too_many_connections") == 1


async def test_a_heartbeat_drop_gives_the_users_slot_back_at_once(start_service: StartService) -> None:
    service = await start_service(max_connections_per_user=1, heartbeat=0.4)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    silent = await handshake(service.ws_url(did), auth(token))
    try:
        assert silent.status == 101
        await hub_count(service, 1)
        await hub_count(service, 0, timeout=5)  # the heartbeat drop
        client = await service.connect(did, token)
        await client.close()
    finally:
        silent.close()


def test_client_address_walks_forwarded_for_from_the_right() -> None:
    trusted = parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])
    assert client_address("10.1.2.3", ["198.51.100.1, 203.0.113.9, 10.0.0.5"], trusted) == "203.0.113.9"
    assert client_address("10.1.2.3", ["198.51.100.1", "203.0.113.9"], trusted) == "203.0.113.9"  # two headers
    assert client_address("203.0.113.7", ["198.51.100.1"], trusted) == "203.0.113.7"  # untrusted peer: its own
    assert client_address("10.1.2.3", [], trusted) == "10.1.2.3"
    assert client_address("10.1.2.3", ["10.0.0.9"], trusted) == "10.0.0.9"  # all trusted: the left-most
    assert client_address("10.1.2.3", ["garbage, 10.0.0.9"], trusted) == "10.0.0.9"  # stops at what is no address
    assert client_address("10.1.2.3", ["203.0.113.9:4711"], trusted) == "203.0.113.9"
    assert client_address("10.1.2.3", ["[2001:db8::1]:443"], trusted) == "2001:db8::1"
    assert client_address("::ffff:10.1.2.3", ["203.0.113.9"], trusted) == "203.0.113.9"
    assert client_address("10.1.2.3", ["203.0.113.9"], ()) == "10.1.2.3"


def test_rate_key_groups_an_ipv6_64_and_the_limiter_is_bounded() -> None:
    assert rate_key("2001:db8:1:2::1") == rate_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert rate_key("203.0.113.9") == "203.0.113.9"
    limiter = ConnectRateLimiter(rate=1, burst=2, max_tracked=100)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.allow("a", 1.0) == 0.0  # one token back after a second
    for n in range(500):
        limiter.allow(str(ipaddress.ip_address(n)), 2.0)
    assert len(limiter) == 100
    assert not ConnectRateLimiter(rate=0, burst=0).enabled


async def test_local_connection_counter() -> None:
    counter = LocalConnectionCounter()
    assert await counter.acquire(7, "a", 2)
    assert await counter.acquire(7, "a", 2)  # the same session again is no second slot
    assert await counter.acquire(7, "b", 2)
    assert not await counter.acquire(7, "c", 2)
    await counter.release(7, "a")
    await counter.release(7, "a")  # twice is harmless
    await counter.release(9, "x")  # never acquired: harmless
    assert await counter.acquire(7, "c", 2)
    assert counter.count(7) == 2


# -- access audit ------------------------------------------------------------------------------------------------------

def _audit(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "realtime.audit" and getattr(r, "event", None) == event]


async def test_one_audit_line_per_connection_opened_and_closed_without_a_token(
        start_service: StartService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="realtime.audit")
    service = await start_service()
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid), method="query", device="phone-1")
    framed = await service.open(did, service.tokens.user(uid), method="auth_frame", device="browser")
    await framed.wait(lambda c: c.of_type("connect"), "the connect frame")
    started = time.monotonic()
    await asyncio.sleep(0.2)
    await client.close()

    async def revoke_other() -> None:  # the server closes the second one: forbidden
        other = service.seed.user()
        service.seed.set_owner(did, other)
        async with service.http.post(f"{service.base_url}/api/v1/diagnoses/{did}/revoke", json={},
                                     headers=auth(service.tokens.service())) as resp:
            assert resp.status == 200, await resp.text()

    await revoke_other()
    assert await framed.wait_closed() == 1008
    await scrape_until(service, lambda _: len(_audit(caplog, "ws_close")) == 2, "two close lines")
    opened = _audit(caplog, "ws_open")
    closed = {r.device: r for r in _audit(caplog, "ws_close")}  # type: ignore[attr-defined]
    assert sorted(r.device for r in opened) == ["browser", "phone-1"]  # type: ignore[attr-defined]
    for record in opened:
        assert (record.user_id, record.diagnosis_id, record.client) == (uid, did, "127.0.0.1")  # type: ignore[attr-defined]
    phone, browser = closed["phone-1"], closed["browser"]
    assert phone.close_reason == "client"  # type: ignore[attr-defined]
    assert browser.close_reason == "forbidden" and browser.close_code == 1008  # type: ignore[attr-defined]
    assert 0.2 <= phone.duration_s <= time.monotonic() - started + 1  # type: ignore[attr-defined]
    for record in (*opened, phone, browser):
        assert record.session  # type: ignore[attr-defined]
        line = JsonFormatter().format(record)
        raw = logging.Formatter().format(record) + repr(vars(record))
        for token in service.tokens.minted:
            assert token not in raw and token not in line
        assert json.loads(line)["user_id"] == uid


async def test_a_refused_user_is_audited(start_service: StartService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="realtime.audit")
    service = await start_service()
    _, did = service.seed.owned()
    intruder = service.seed.user()
    client: Client = await service.open(did, service.tokens.user(intruder))
    assert await client.wait_closed() == 1008
    refused = _audit(caplog, "ws_refused")
    assert [(r.user_id, r.diagnosis_id, r.close_reason) for r in refused] == [  # type: ignore[attr-defined]
        (intruder, did, "forbidden")]
    assert not _audit(caplog, "ws_open")
