"""PROTOCOL 3.1-3.6, 3.9, 3.10 over real sockets: auth, close codes, frames, refresh, heartbeat, origins,
compression, ids, slow consumers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import psycopg2
import pytest

from tests.fixtures_app import Service, StartService
from tests.support import Client
from tests.wsraw import RawWebSocket, handshake

APP_ORIGIN = "https://app.example.test"


def exp_of(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def presence_users(service: Service, did: int) -> list[dict[str, Any]]:
    async with service.http.get(f"{service.base_url}/api/v1/diagnoses/{did}/presence",
                                headers=auth(service.tokens.service())) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        users: list[dict[str, Any]] = body["users"]
        return users


async def status_connections(service: Service) -> int:
    async with service.http.get(f"{service.base_url}/ws/status") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return int(body["connections"])


async def until(check: Any, what: str, timeout: float = 10.0, every: float = 0.05) -> None:
    """Poll an async condition with a bound (for server state that no frame announces)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


async def metric(service: Service, name: str) -> float:
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def assert_alive(client: Client) -> None:
    """The connection still answers an application ping."""
    await client.send({"type": "ping"})
    pong = await client.next_of("pong")
    assert "timestamp" in pong["data"]


# -- 3.1 authentication ----------------------------------------------------------------------------------------

async def open_both(service: Service, did: int, header_token: str, query_token: str) -> Client:
    """Header and query token on the same upgrade request."""
    ws = await service.http.ws_connect(service.ws_url(did, token=query_token), headers=auth(header_token),
                                       max_msg_size=0)
    return Client(ws).start()


async def test_header_wins_over_query_token(service: Service) -> None:
    owner, did = service.seed.owned()
    stranger = service.seed.user()
    client = await open_both(service, did, service.tokens.user(owner), service.tokens.user(stranger))
    hello = await client.next_of("connect")
    assert hello["data"]["user_id"] == owner
    await client.close()
    # and the other way round: the header's (wrong) user is the one checked, not the valid query token
    refused = await open_both(service, did, service.tokens.user(stranger), service.tokens.user(owner))
    assert await refused.wait_closed() == 1008
    assert refused.close_reason == "forbidden"


async def test_auth_frame_carries_device_and_connects(service: Service) -> None:
    owner, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(owner), "auth_frame", auth_extra={"device": "tablet"})
    assert client.frames[0]["data"]["user_id"] == owner
    assert [u["devices"] for u in await presence_users(service, did)] == [["tablet"]]
    await client.close()


@pytest.mark.parametrize("method", ["header", "query", "auth_frame"])
async def test_integer_sub_is_a_user_id(service: Service, method: str) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.encode({"sub": uid, "exp": int(time.time()) + 60})
    client = await service.connect(did, token, method)
    assert client.frames[0]["data"]["user_id"] == uid
    await client.close()


FIRST_FRAMES: list[tuple[str, Any]] = [
    ("ping", {"type": "ping"}),
    ("not_json", "hello"),
    ("array", [{"type": "auth"}]),
    ("auth_without_token", {"type": "auth"}),
    ("auth_empty_token", {"type": "auth", "token": ""}),
    ("auth_token_not_string", {"type": "auth", "token": 42}),
    ("binary", b"\x81\x00"),
]


@pytest.mark.parametrize(("case", "frame"), FIRST_FRAMES, ids=[c for c, _ in FIRST_FRAMES])
async def test_first_frame_not_auth_closes_invalid_token_at_once(start_service: StartService, case: str,
                                                                  frame: Any) -> None:
    service = await start_service(auth_timeout=5)
    _, did = service.seed.owned()
    client = await service.open(did, None, "none")
    started = time.monotonic()
    if isinstance(frame, bytes):
        await client.ws.send_bytes(frame)
    elif isinstance(frame, str):
        await client.ws.send_str(frame)
    else:
        await client.send(frame)
    assert await client.wait_closed() == 1008
    assert client.close_reason == "invalid_token"
    assert time.monotonic() - started < 1.0, "must not wait for the auth timeout"
    assert not client.of_type("connect")


@pytest.mark.parametrize("pinging", [False, True], ids=["silent", "protocol_pings_only"])
async def test_auth_timeout_is_measured(start_service: StartService, pinging: bool) -> None:
    service = await start_service(auth_timeout=0.5)
    _, did = service.seed.owned()
    started = time.monotonic()
    client = await service.open(did, None, "none")

    async def keep_pinging() -> None:
        while not client.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await client.ws.ping()
            await asyncio.sleep(0.1)

    pinger = asyncio.create_task(keep_pinging()) if pinging else None
    try:
        assert await client.wait_closed(timeout=5) == 1008
    finally:
        if pinger is not None:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
    elapsed = time.monotonic() - started
    assert client.close_reason == "auth_timeout"
    assert 0.45 <= elapsed <= 1.5, elapsed
    assert not client.frames


# -- 3.3 close codes -------------------------------------------------------------------------------------------

BAD_TOKENS = ["garbage", "wrong_secret", "alg_none", "no_exp", "not_yet_valid", "sub_not_user"]


def bad_token(service: Service, case: str, uid: int) -> str:
    now = int(time.time())
    return {
        "garbage": lambda: "not-a-jwt",
        "wrong_secret": lambda: service.tokens.encode({"sub": str(uid), "exp": now + 60}, key="x" * 32),
        "alg_none": lambda: jwt.encode({"sub": str(uid), "exp": now + 60}, None, algorithm="none"),
        "no_exp": lambda: service.tokens.encode({"sub": str(uid)}),
        "not_yet_valid": lambda: service.tokens.encode({"sub": str(uid), "exp": now + 600, "nbf": now + 300}),
        "sub_not_user": lambda: service.tokens.encode({"sub": "alice", "exp": now + 60}),
    }[case]()


@pytest.mark.parametrize("case", BAD_TOKENS)
@pytest.mark.parametrize("method", ["header", "query", "auth_frame"])
async def test_bad_token_closes_invalid_token(service: Service, case: str, method: str) -> None:
    uid, did = service.seed.owned()
    client = await service.open(did, bad_token(service, case, uid), method)
    assert await client.wait_closed() == 1008
    assert client.close_reason == "invalid_token"
    assert not client.of_type("connect")


@pytest.mark.parametrize("method", ["header", "auth_frame"])
async def test_refusals_at_connect(start_service: StartService, method: str) -> None:
    service = await start_service(jwt_leeway=0)
    uid, did = service.seed.owned()
    cases = [
        (did, service.tokens.user(uid, ttl=-1), "token_expired"),
        (service.seed.unknown(), service.tokens.user(uid), "diagnosis_not_found"),
        (did, service.tokens.user(service.seed.user()), "forbidden"),
        (did, service.tokens.service(sub=str(uid)), "forbidden"),
    ]
    for target, token, reason in cases:
        client = await service.open(target, token, method)
        assert await client.wait_closed() == 1008, reason
        assert (client.close_reason, client.of_type("connect")) == (reason, [])


async def test_token_expiry_while_connected_is_measured(start_service: StartService) -> None:
    service = await start_service(jwt_leeway=0)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid, ttl=2)
    exp = exp_of(token)
    client = await service.connect(did, token)
    assert time.time() < exp - 0.5, "the token must still be valid for a while after connect"
    await assert_alive(client)
    assert await client.wait_closed(timeout=5) == 1008
    closed_at = time.time()
    assert client.close_reason == "token_expired"
    assert exp - 0.1 <= closed_at <= exp + 1.0, closed_at - exp


async def test_leeway_is_honoured_at_connect_and_while_connected(start_service: StartService) -> None:
    leeway = 3
    service = await start_service(jwt_leeway=leeway)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid, ttl=-1)  # expired 1-2 s ago, within the leeway
    exp = exp_of(token)
    client = await service.connect(did, token)
    assert await client.wait_closed(timeout=5) == 1008
    closed_at = time.time()
    assert client.close_reason == "token_expired"
    assert exp + leeway - 0.1 <= closed_at <= exp + leeway + 1.0, closed_at - exp


async def test_rate_limited(start_service: StartService) -> None:
    service = await start_service(rate_limit=2, rate_burst=4)
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    for _ in range(3):  # within the burst: answered
        await client.send({"type": "ping"})
    await client.wait(lambda c: len(c.of_type("pong")) == 3, "three pongs")
    for _ in range(20):
        if client.ws.closed:
            break
        await client.send({"type": "ping"})
    assert await client.wait_closed() == 1008
    assert client.close_reason == "rate_limited"


@pytest.mark.parametrize("phase", ["connected", "awaiting_auth"])
async def test_frame_over_max_frame_bytes_closes_1009(start_service: StartService, phase: str) -> None:
    service = await start_service(max_frame_bytes=1024)
    uid, did = service.seed.owned()
    if phase == "connected":
        client = await service.connect(did, service.tokens.user(uid))
        under = json.dumps({"type": "ping", "pad": ""})
        under = json.dumps({"type": "ping", "pad": "x" * (1020 - len(under))})
        assert 1000 < len(under) < 1024
        await client.ws.send_str(under)
        await client.next_of("pong")
    else:
        client = await service.open(did, None, "none")
    await client.send({"type": "ping", "pad": "x" * 2000})
    assert await client.wait_closed() == 1009


async def raw_connected(service: Service, did: int, token: str) -> RawWebSocket:
    """A raw connection past its `connect` frame."""
    conn = await handshake(service.ws_url(did), auth(token))
    assert conn.status == 101
    opcode, payload = await conn.recv_frame()
    assert opcode == 0x1
    assert json.loads(payload)["type"] == "connect"
    return conn


async def next_text_or_close(conn: RawWebSocket) -> tuple[int, bytes]:
    """The next text or close frame (protocol PINGs are skipped)."""
    while True:
        opcode, payload = await conn.recv_frame()
        if opcode in (0x1, 0x8):
            return opcode, payload


async def test_fragmented_message_is_one_frame_for_the_limit(start_service: StartService) -> None:
    """The limit is on the message: fragments under it that add up to more than it are refused 1009."""
    service = await start_service(max_frame_bytes=1024)
    uid, did = service.seed.owned()
    conn = await raw_connected(service, did, service.tokens.user(uid))
    try:
        small = json.dumps({"type": "ping", "pad": "x" * 300}).encode()
        await conn.send_frame(0x1, small[:150], fin=False)
        await conn.send_frame(0x0, small[150:], fin=True)
        opcode, payload = await next_text_or_close(conn)
        assert opcode == 0x1
        assert json.loads(payload)["type"] == "pong"
        big = json.dumps({"type": "ping", "pad": "x" * 1500}).encode()
        pieces = [big[i:i + 500] for i in range(0, len(big), 500)]
        for index, piece in enumerate(pieces):
            await conn.send_frame(0x1 if index == 0 else 0x0, piece, fin=index == len(pieces) - 1)
        opcode, payload = await next_text_or_close(conn)
        assert opcode == 0x8, payload
        assert struct.unpack("!H", payload[:2])[0] == 1009
    finally:
        conn.close()


async def test_compressed_frame_is_limited_by_its_inflated_size(start_service: StartService) -> None:
    service = await start_service(max_frame_bytes=1024, ws_compression=True)
    uid, did = service.seed.owned()
    ws = await service.http.ws_connect(service.ws_url(did), headers=auth(service.tokens.user(uid)), compress=15)
    assert ws.compress == 15
    client = Client(ws).start()
    await client.next_of("connect")
    await client.send({"type": "ping", "pad": "x" * 800})  # compresses well, inflates under the limit
    await client.next_of("pong")
    await client.send({"type": "ping", "pad": "x" * 200_000})  # a few hundred bytes on the wire
    assert await client.wait_closed() == 1009


async def test_auth_frame_just_under_max_frame_bytes_connects(start_service: StartService) -> None:
    service = await start_service(max_frame_bytes=1024)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    frame = {"type": "auth", "token": token, "pad": ""}
    frame["pad"] = "p" * (1020 - len(json.dumps(frame)))
    assert len(json.dumps(frame)) < 1024
    client = await service.open(did, None, "none")
    await client.send(frame)
    await client.next_of("connect")
    await client.close()


# -- 3.4 / 3.5 client frames -----------------------------------------------------------------------------------

async def test_ping_gets_pong(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    await client.send({"type": "ping"})
    pong = await client.next_of("pong")
    assert pong["diagnosis_id"] == did
    assert pong["timestamp"].endswith("Z")
    assert pong["data"]["timestamp"].endswith("Z")
    assert "offset" not in pong
    await client.close()


BAD_FRAMES: list[tuple[str, str | bytes]] = [
    ("invalid_json", "{not json"),
    ("binary", b'{"type": "ping"}'),
    ("array", "[1, 2]"),
    ("string", '"ping"'),
    ("null", "null"),
    ("no_type", '{"offset": 3}'),
    ("type_not_string", '{"type": 5}'),
    ("unknown_type", '{"type": "subscribe"}'),
    ("ack_without_offset", '{"type": "ack"}'),
    ("ack_string_offset", '{"type": "ack", "offset": "3"}'),
    ("ack_negative_offset", '{"type": "ack", "offset": -1}'),
]


async def test_every_bad_frame_gets_error_and_connection_stays(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    for case, raw in BAD_FRAMES:
        seen = len(client.frames)
        if isinstance(raw, bytes):
            await client.ws.send_bytes(raw)
        else:
            await client.ws.send_str(raw)
        error = await client.next_of("error")
        assert error["diagnosis_id"] == did, case
        assert isinstance(error["data"]["code"], str), case
        assert error["data"]["code"], case
        assert isinstance(error["data"]["message"], str), case
        assert error["data"]["message"], case
        assert error["timestamp"].endswith("Z"), case
        assert [f["type"] for f in client.frames[seen:]] == ["error"], case
        assert not client.closed, case
    await assert_alive(client)
    # and broadcasts still arrive
    await service.publish(did, "still_here")
    assert (await client.next_of("still_here"))["offset"] == 1
    await client.close()


# -- 3.5 in-band refresh ---------------------------------------------------------------------------------------

async def test_refresh_with_same_sub_moves_expiry(start_service: StartService) -> None:
    service = await start_service(jwt_leeway=0)
    uid, did = service.seed.owned()
    first = service.tokens.user(uid, ttl=2)
    exp = exp_of(first)
    client = await service.connect(did, first)
    await client.send({"type": "auth", "token": service.tokens.user(uid, ttl=3600)})
    await assert_alive(client)  # frames are handled in order: the refresh is done
    # the condition is time: wait until well past the first token's expiry
    await asyncio.sleep(max(0.0, exp + 1.0 - time.time()))
    assert not client.closed, (client.close_code, client.close_reason)
    await assert_alive(client)
    await client.close()


@pytest.mark.parametrize(("case", "reasons"), [
    ("other_sub", {"forbidden", "invalid_token"}),
    ("service_token_same_sub", {"forbidden", "invalid_token"}),
    ("garbage", {"invalid_token"}),
    ("wrong_secret", {"invalid_token"}),
    ("expired", {"token_expired"}),
    ("empty", {"invalid_token"}),
])
async def test_refresh_with_other_sub_or_bad_token_closes_1008(start_service: StartService, case: str,
                                                               reasons: set[str]) -> None:
    service = await start_service(jwt_leeway=0)
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    token = {
        "other_sub": lambda: service.tokens.user(service.seed.user()),
        "service_token_same_sub": lambda: service.tokens.service(sub=str(uid)),
        "garbage": lambda: "not-a-jwt",
        "wrong_secret": lambda: bad_token(service, "wrong_secret", uid),
        "expired": lambda: service.tokens.user(uid, ttl=-5),
        "empty": lambda: "",
    }[case]()
    await client.send({"type": "auth", "token": token})
    assert await client.wait_closed() == 1008
    assert client.close_reason in reasons


# -- 3.6 heartbeat ---------------------------------------------------------------------------------------------

async def raw_ws(service: Service, did: int, token: str, **query: Any) -> aiohttp.ClientWebSocketResponse:
    """A client that sees protocol PINGs itself (autoping off): it answers only when the test says so."""
    return await service.http.ws_connect(service.ws_url(did, **query), headers=auth(token), autoping=False,
                                         max_msg_size=0)


async def test_server_pings_every_heartbeat_and_answering_client_stays(start_service: StartService) -> None:
    service = await start_service(heartbeat=0.5)
    uid, did = service.seed.owned()
    ws = await raw_ws(service, did, service.tokens.user(uid))
    pings: list[float] = []
    texts: list[dict[str, Any]] = []
    deadline = time.monotonic() + 6
    while len(pings) < 6:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg.type is aiohttp.WSMsgType.PING:
            pings.append(time.monotonic())
            await ws.pong(msg.data)
        elif msg.type is aiohttp.WSMsgType.TEXT:
            texts.append(json.loads(msg.data))
        else:
            raise AssertionError(f"unexpected {msg.type} after {len(pings)} pings: {msg.extra!r}")
    assert [t["type"] for t in texts] == ["connect"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.4 <= sum(gaps) / len(gaps) <= 0.65, gaps
    assert max(gaps) < 0.9, gaps
    # answered for 2.5 s, i.e. five heartbeats: still connected and present
    assert [u["user_id"] for u in await presence_users(service, did)] == [uid]
    await ws.send_str(json.dumps({"type": "ping"}))
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type is aiohttp.WSMsgType.PING:
            await ws.pong(msg.data)
            continue
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        if json.loads(msg.data)["type"] == "pong":
            break
    await ws.close()


async def test_client_that_stops_answering_is_dropped_within_two_heartbeats(start_service: StartService) -> None:
    service = await start_service(heartbeat=0.5)
    uid, did = service.seed.owned()
    ws = await raw_ws(service, did, service.tokens.user(uid))
    answered = 0
    silent_since = 0.0
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type is aiohttp.WSMsgType.PING:
            if answered < 2:
                await ws.pong(msg.data)
                answered += 1
                silent_since = time.monotonic()
                if answered == 2:
                    assert [u["user_id"] for u in await presence_users(service, did)] == [uid]
            continue
        if msg.type is aiohttp.WSMsgType.TEXT:
            continue
        break
    dropped_after = time.monotonic() - silent_since
    assert answered == 2, f"dropped before going silent: {msg.type} {msg.extra!r}"
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
    assert dropped_after <= 2 * 0.5 + 0.3, dropped_after

    async def gone() -> bool:
        return await presence_users(service, did) == []

    await until(gone, "the silent client to leave presence", timeout=2)
    assert await status_connections(service) == 0
    await ws.close()


# -- 3.9 origins and compression -------------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["https://evil.example.test", "http://app.example.test",
                                    "https://app.example.test:8443", "null", "https://app.example.test.evil.test"])
async def test_foreign_origin_refused_403_before_upgrade(start_service: StartService, origin: str) -> None:
    service = await start_service(allowed_origins=(APP_ORIGIN,))
    uid, did = service.seed.owned()
    answer = await handshake(service.ws_url(did), {"Origin": origin, **auth(service.tokens.user(uid))})
    answer.close()
    assert answer.status == 403
    assert "sec-websocket-accept" not in answer.headers
    assert json.loads(answer.body)["error"]["code"]
    assert await status_connections(service) == 0


@pytest.mark.parametrize("origin", [APP_ORIGIN, None])
async def test_allowed_or_absent_origin_connects(start_service: StartService, origin: str | None) -> None:
    service = await start_service(allowed_origins=(APP_ORIGIN,))
    uid, did = service.seed.owned()
    headers = {"Origin": origin} if origin else {}
    client = await service.connect(did, service.tokens.user(uid), headers=headers)
    await client.close()


@pytest.mark.parametrize("console", [True, False])
async def test_console_own_origin_allowed_only_with_console(start_service: StartService, console: bool) -> None:
    service = await start_service(allowed_origins=(APP_ORIGIN,), console_enabled=console)
    uid, did = service.seed.owned()
    own = service.base_url  # http://127.0.0.1:<port>, the origin the console page is served from
    answer = await handshake(service.ws_url(did), {"Origin": own, **auth(service.tokens.user(uid))})
    answer.close()
    assert answer.status == (101 if console else 403)


async def test_permessage_deflate_off_by_default(service: Service) -> None:
    uid, did = service.seed.owned()
    answer = await handshake(service.ws_url(did), {"Sec-WebSocket-Extensions": "permessage-deflate",
                                                   **auth(service.tokens.user(uid))})
    answer.close()
    assert answer.status == 101
    assert "sec-websocket-extensions" not in answer.headers
    ws = await service.http.ws_connect(service.ws_url(did), headers=auth(service.tokens.user(uid)), compress=15)
    assert ws.compress == 0
    await ws.close()


async def test_permessage_deflate_negotiated_when_configured(start_service: StartService) -> None:
    service = await start_service(ws_compression=True)
    uid, did = service.seed.owned()
    ws = await service.http.ws_connect(service.ws_url(did), headers=auth(service.tokens.user(uid)), compress=15)
    assert ws.compress == 15
    client = Client(ws).start()
    await client.next_of("connect")
    await service.publish(did, "big", {"text": "abc" * 5000})
    assert (await client.next_of("big"))["data"]["text"] == "abc" * 5000
    await client.close()
    answer = await handshake(service.ws_url(did), {"Sec-WebSocket-Extensions": "permessage-deflate",
                                                   **auth(service.tokens.user(uid))})
    answer.close()
    assert answer.status == 101
    assert "permessage-deflate" in answer.headers.get("sec-websocket-extensions", "")


@pytest.mark.parametrize("bad_id", ["abc", "0", "-1", "1.5", "0x10", "1e3", "%201", "1%20"])
async def test_non_positive_integer_id_is_404_before_upgrade(service: Service, bad_id: str) -> None:
    uid, _ = service.seed.owned()
    url = f"{service.base_url.replace('http://', 'ws://')}/ws/{bad_id}"
    answer = await handshake(url, auth(service.tokens.user(uid)))
    answer.close()
    assert answer.status == 404
    assert "sec-websocket-accept" not in answer.headers


def insert_diagnosis(service: Service, did: int, owner: int) -> None:
    conn = psycopg2.connect(service.seed.dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("INSERT INTO diagnoses (id, user_id) VALUES (%s, %s)", (did, owner))
    finally:
        conn.close()


async def test_largest_bigint_ids_are_positive_integers_too(service: Service) -> None:
    """Ids are bigint in the main API (snowflake-style ids have 19 digits); REST accepts them, so must the socket."""
    uid = service.seed.user()
    for did in (10**18 + service.seed.unknown(), 2**63 - 1 - service.seed.unknown()):
        insert_diagnosis(service, did, uid)
        answer = await handshake(service.ws_url(did), auth(service.tokens.user(uid)))
        answer.close()
        assert answer.status == 101, f"diagnosis {did} ({len(str(did))} digits) refused with {answer.status}"
        client = await service.connect(did, service.tokens.user(uid))
        assert client.frames[0]["diagnosis_id"] == did
        assert (await service.publish(did))["offset"] == 1
        assert (await client.next_of("test_event"))["diagnosis_id"] == did
        await client.close()


async def test_ids_beyond_bigint_are_404(service: Service) -> None:
    uid, _ = service.seed.owned()
    for did in (2**63, 10**19, 10**30):
        answer = await handshake(service.ws_url(did), auth(service.tokens.user(uid)))
        answer.close()
        assert answer.status == 404, did


# -- 3.10 slow consumers ---------------------------------------------------------------------------------------

PAYLOAD = 16 * 1024


def kernel_send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


async def test_slow_consumer_closed_while_others_get_everything(start_service: StartService) -> None:
    service = await start_service(outbox_max_messages=50, outbox_max_bytes=65536)
    uid, did = service.seed.owned()
    fast = [await service.connect(did, service.tokens.user(uid), device=f"fast{i}") for i in range(2)]
    slow = await handshake(service.ws_url(did, device="slow"), auth(service.tokens.user(uid)), rcvbuf=4096)
    try:
        assert slow.status == 101

        async def three() -> bool:
            return await status_connections(service) == 3

        await until(three, "the slow client to be attached")
        assert await metric(service, "realtime_slow_consumer_closes_total") == 0
        # The kernel absorbs up to tcp_wmem's maximum in the server's send buffer (autotuned, ~4 MiB): publish
        # well past it, so the slow client's outbox has to fill.
        payload = "x" * PAYLOAD
        total = max(400, (kernel_send_buffer_max() + 2 * 1024 * 1024) // PAYLOAD)
        slowest = 0.0
        for i in range(1, total + 1):
            started = time.monotonic()
            result = await service.publish(did, "bulk", {"i": i, "payload": payload})
            slowest = max(slowest, time.monotonic() - started)
            assert result["offset"] == i
        for client in fast:
            await client.wait_offset(total, timeout=20)
            bulk = client.of_type("bulk")
            assert [f["offset"] for f in bulk] == list(range(1, total + 1))
            assert [f["data"]["i"] for f in bulk] == list(range(1, total + 1))
            assert not client.closed
        assert slowest < 1.0, f"a publish waited {slowest:.2f}s"

        async def two() -> bool:
            return await status_connections(service) == 2

        await until(two, "the slow client to be dropped")
        assert await metric(service, "realtime_slow_consumer_closes_total") == 1
        assert await metric(service, 'realtime_disconnects_total{reason="slow_consumer"}') == 1
        devices = [u["devices"] for u in await presence_users(service, did)]
        assert len(devices) == 1
        assert sorted(devices[0]) == ["fast0", "fast1"]
    finally:
        slow.close()
        for client in fast:
            await client.close()


async def test_slow_client_that_reads_again_sees_a_gapless_prefix_then_1013(start_service: StartService) -> None:
    """The client is told why it was dropped, so it knows to reconnect and resume."""
    service = await start_service(outbox_max_messages=50, outbox_max_bytes=65536)
    uid, did = service.seed.owned()
    slow = await handshake(service.ws_url(did, device="slow"), auth(service.tokens.user(uid)), rcvbuf=4096)
    try:
        assert slow.status == 101

        async def attached() -> bool:
            return await status_connections(service) == 1

        await until(attached, "the slow client to be attached")
        payload = "x" * PAYLOAD
        total = max(400, (kernel_send_buffer_max() + 2 * 1024 * 1024) // PAYLOAD)
        for i in range(1, total + 1):
            await service.publish(did, "bulk", {"i": i, "payload": payload})
            if i % 50 == 0 and await metric(service, "realtime_slow_consumer_closes_total") >= 1:
                break
        assert await metric(service, "realtime_slow_consumer_closes_total") == 1
        # now it reads again
        offsets: list[int] = []
        while True:
            opcode, data = await slow.recv_frame(timeout=10)
            if opcode == 0x1:
                frame = json.loads(data)
                if frame["type"] == "bulk":
                    offsets.append(frame["offset"])
            elif opcode == 0x8:
                break
        assert offsets == list(range(1, len(offsets) + 1))
        assert struct.unpack("!H", data[:2])[0] == 1013
        assert data[2:].decode() == "slow_consumer"
    finally:
        slow.close()
