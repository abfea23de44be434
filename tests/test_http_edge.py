"""Issue 9, findings 6, 7 and 9: the HTTP edge under clients that are slow, broken or hostile.

- 6: idle and half-sent connections are closed (head deadline, body silence and deadline, keep-alive).
- 7: what a client gets wrong is one INFO line without a traceback, folded when repeated; a hang-up is no 5xx.
- 9: `dev` answers only the Hosts it knows; the console's origin comes from configuration, not the Host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from realtime_service.logs import Repeats
from realtime_service.settings import ConfigError, load_settings
from realtime_service.web.state import STATE
from tests.edge_support import StartEdge, close_quietly, closed_by_server, connect
from tests.fixtures_app import StartService
from tests.support import Tokens
from tests.test_metrics import Scrape
from tests.test_settings_cli import ServerProcess, serve_env
from tests.wsraw import handshake

PUBLISH_HEAD = (b"POST /api/v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 500\r\nAuthorization: Bearer %s\r\n\r\n")


async def _scrape(base_url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as resp:
        return Scrape(await resp.text())


# -- finding 6: deadlines -----------------------------------------------------------------------------------

async def test_connections_that_send_nothing_or_a_slow_head_are_closed(start_edge: StartEdge) -> None:
    """200 sockets that never send a byte and one slowloris upgrade are all cut at the head deadline, while a
    client that sends its request normally is answered meanwhile."""
    server = await start_edge(http_head_timeout=1.0)
    idle = [await connect(server.port) for _ in range(200)]
    slow_reader, slow_writer = await connect(server.port)
    head = (b"GET /ws/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nX-Padding: " + b"a" * 200)

    async def trickle() -> None:
        for byte in head:  # bounded: the head is finite, a byte every 50 ms, never completed
            slow_writer.write(bytes([byte]))
            await slow_writer.drain()
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{server.base_url}/healthz") as resp:
            assert resp.status == 200
        for reader, _ in idle:
            assert await closed_by_server(reader, 4.0) == b""
        assert await closed_by_server(slow_reader, 4.0) == b""
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 4.0, elapsed
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        for _, writer in [*idle, (slow_reader, slow_writer)]:
            close_quietly(writer)

    async def drained() -> bool:
        return server.open_connections == 0

    deadline = time.monotonic() + 3
    while not await drained():
        assert time.monotonic() < deadline, f"{server.open_connections} connections still open"
        await asyncio.sleep(0.05)


async def test_a_served_keep_alive_connection_lives_until_the_keep_alive_timeout(start_edge: StartEdge) -> None:
    """The head deadline is for a connection's first request; once served, the idle keep-alive timeout rules."""
    server = await start_edge(http_head_timeout=0.5, http_keepalive_timeout=2.5)
    reader, writer = await connect(server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b'"ok"}'), 5)
        assert answer.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.2)  # past the head deadline, within keep-alive: still usable
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b'"ok"}'), 5)
        assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert await closed_by_server(reader, 5.0) == b""
        assert 2.0 <= time.monotonic() - started < 5.0
    finally:
        close_quietly(writer)


async def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(start_edge: StartEdge) -> None:
    """20 of 500 promised bytes, then silence: 408 body_timeout after the silence limit, then the socket closes."""
    server = await start_edge(http_body_timeout=1.0, http_body_deadline=30)
    token = Tokens().service()
    reader, writer = await connect(server.port)
    try:
        writer.write(PUBLISH_HEAD % token.encode() + b'{"diagnosis_id": 1, "')
        await writer.drain()
        started = time.monotonic()
        answer = await closed_by_server(reader, 5.0)
        elapsed = time.monotonic() - started
    finally:
        close_quietly(writer)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"
    assert 0.9 <= elapsed < 3.5, elapsed


async def test_a_body_trickled_byte_by_byte_is_cut_at_the_body_deadline(start_edge: StartEdge) -> None:
    """Never silent for long, never finished: the whole-body deadline ends it."""
    server = await start_edge(http_body_timeout=1.0, http_body_deadline=2.0)
    token = Tokens().service()
    reader, writer = await connect(server.port)
    writer.write(PUBLISH_HEAD % token.encode())
    await writer.drain()

    async def trickle() -> None:
        for _ in range(200):  # bounded: 200 bytes at most, one every 0.2 s
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.2)

    sender = asyncio.create_task(trickle())
    started = time.monotonic()
    try:
        answer = await closed_by_server(reader, 6.0)
        elapsed = time.monotonic() - started
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        close_quietly(writer)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 1.9 <= elapsed < 4.5, elapsed


async def test_a_body_that_arrives_in_pieces_within_the_limits_is_served(start_edge: StartEdge) -> None:
    server = await start_edge(http_body_timeout=1.0, http_body_deadline=10)
    tokens = Tokens()
    seed_state = server.app[STATE]
    assert seed_state.settings.http_body_timeout == 1.0
    body = json.dumps({"diagnosis_id": 1, "type": "x", "data": {"pad": "p" * 300}}).encode()
    reader, writer = await connect(server.port)
    try:
        writer.write(b"POST /api/v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n" % (len(body), tokens.service().encode()))
        for index in range(0, len(body), 100):
            writer.write(body[index:index + 100])
            await writer.drain()
            await asyncio.sleep(0.4)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        close_quietly(writer)
    # diagnosis 1 does not exist: the body was read whole and judged (404), not cut off (408)
    assert head.startswith(b"HTTP/1.1 404"), head


# -- finding 7: client faults are no server errors ------------------------------------------------------------

async def test_a_client_that_hangs_up_mid_body_is_a_4xx_and_no_error_line(start_edge: StartEdge,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await start_edge()
    token = Tokens().service()
    for _ in range(3):
        _, writer = await connect(server.port)
        writer.write(PUBLISH_HEAD % token.encode() + b'{"diagnosis_id": 1, "')
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        scrape = await _scrape(server.base_url)
        if scrape.value("realtime_http_requests_total", route="/api/v1/publish", status="4xx") >= 3:
            break
        assert loop.time() < deadline, "the hang-ups were never counted"
        await asyncio.sleep(0.05)
    assert scrape.value("realtime_http_requests_total", route="/api/v1/publish", status="5xx") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    gone = [r for r in caplog.records if getattr(r, "kind", None) == "client_gone"]
    assert 1 <= len(gone) <= 3


def test_repeats_folds_a_burst_and_reports_what_it_held_back() -> None:
    now = [0.0]
    repeats = Repeats(burst=3, window=10.0, clock=lambda: now[0])
    assert [repeats.admit("LineTooLong") for _ in range(5)] == [0, 0, 0, None, None]
    assert repeats.admit("BadHttpMessage") == 0  # kinds are counted apart
    now[0] = 10.5
    assert repeats.admit("LineTooLong") == 2  # the first line of the next window says 2 were held back
    assert repeats.admit("LineTooLong") == 0


MALFORMED = {
    "LineTooLong": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "BadHttpMessage": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: y\r\n\r\n",
    "both": (b"POST /api/v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
}


@pytest.fixture
async def servers() -> AsyncIterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.kill()


async def test_serve_logs_malformed_requests_at_info_without_tracebacks_and_closes_idle_sockets(
        pg_dsn: str, tmp_path: Path, servers: list[ServerProcess]) -> None:
    """The real `serve`: 12 over-long lines, 3 bad headers, 3 Content-Length + Transfer-Encoding each get 400;
    the log has no ERROR and no traceback, and at most 5 lines per kind (access lines included). A socket that
    sends nothing is closed at REALTIME_HTTP_HEAD_TIMEOUT."""
    server = await ServerProcess.start(serve_env(pg_dsn, "s" * 32, REALTIME_HTTP_HEAD_TIMEOUT="1"), tmp_path)
    servers.append(server)
    await server.ready()
    idle_reader, idle_writer = await connect(server.port)
    try:
        for name, count in (("LineTooLong", 12), ("BadHttpMessage", 3), ("both", 3)):
            for _ in range(count):
                reader, writer = await connect(server.port)
                writer.write(MALFORMED[name])
                await writer.drain()
                answer = await closed_by_server(reader, 5.0)
                close_quietly(writer)
                assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), (name, answer)
        assert await closed_by_server(idle_reader, 4.0) == b""
    finally:
        close_quietly(idle_writer)
    code, _ = await server.terminate()
    assert code == 0, server.text
    lines = [json.loads(line) for line in server.output if line.startswith("{")]
    assert not [e for e in lines if e["level"] in ("ERROR", "CRITICAL", "WARNING")], server.text
    assert "Traceback" not in server.text
    assert not [e for e in lines if "exception" in e]
    refused = [e for e in lines if e.get("message", "").startswith("refused a malformed")]
    by_kind: dict[str, int] = {}
    for entry in refused:
        assert entry["level"] == "INFO"
        by_kind[entry["kind"]] = by_kind.get(entry["kind"], 0) + 1
    assert 1 <= by_kind.get("LineTooLong", 0) <= 5, by_kind
    assert by_kind.get("BadHttpMessage", 0) >= 1, by_kind  # the bad header and CL+TE are both BadHttpMessage
    assert sum(by_kind.values()) <= 10, by_kind
    assert [e for e in lines if e.get("kind") == "head_timeout"], "the idle socket's close was not logged"
    unparsed_access = [e for e in lines if e.get("method") == "UNKNOWN"]
    assert 1 <= len(unparsed_access) <= 5, unparsed_access  # their access lines are folded too


# -- finding 9: DNS rebinding -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "status"), [
    ("evil.example:{port}", 403), ("evil.example", 403), ("127.0.0.1.evil.example:{port}", 403),
    ("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200), ("LOCALHOST", 200),
    ("devbox.internal:{port}", 200),
])
async def test_development_answers_only_known_hosts(start_service: StartService, host: str, status: int) -> None:
    service = await start_service(env="development", console_enabled=True, allowed_hosts=("devbox.internal",))
    service.app[STATE].demo_tokens = {"user": service.tokens.user(1), "service": service.tokens.service()}
    port = service.server.port
    async with service.http.get(f"{service.base_url}/console", headers={"Host": host.format(port=port)}) as resp:
        text = await resp.text()
        assert resp.status == status, text
    if status == 403:
        assert json.loads(text)["error"]["code"] == "host_not_allowed"
        for token in service.tokens.minted:
            assert token not in text


async def test_development_refuses_a_rebinding_host_on_every_route(start_service: StartService) -> None:
    service = await start_service(env="development", console_enabled=True)
    uid, did = service.seed.owned()
    port = service.server.port
    evil = f"evil.example:{port}"
    for path in ("/ws/status", "/healthz", "/metrics", f"/api/v1/diagnoses/{did}/presence"):
        async with service.http.get(f"{service.base_url}{path}", headers={"Host": evil}) as resp:
            assert resp.status == 403, path
    answer = await handshake(service.ws_url(did), {"Host": evil, "Origin": f"http://{evil}",
                                                   "Authorization": f"Bearer {service.tokens.user(uid)}"})
    answer.close()
    assert answer.status == 403


async def test_production_console_origin_is_the_public_origin_not_the_host(start_service: StartService) -> None:
    """With the console on, an Origin equal to a foreign Host used to pass the WebSocket origin check."""
    service = await start_service(console_enabled=True, public_origin="https://realtime.example.test")
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    port = service.server.port
    evil = f"evil.example:{port}"
    answer = await handshake(service.ws_url(did), {"Host": evil, "Origin": f"http://{evil}",
                                                   "Authorization": f"Bearer {token}"})
    answer.close()
    assert answer.status == 403
    answer = await handshake(service.ws_url(did), {"Origin": "https://realtime.example.test",
                                                   "Authorization": f"Bearer {token}"})
    answer.close()
    assert answer.status == 101


async def test_console_sign_in_from_a_rebinding_origin_is_refused(start_service: StartService) -> None:
    service = await start_service(console_enabled=True)
    port = service.server.port
    evil = f"evil.example:{port}"
    async with service.http.post(f"{service.base_url}/console/session", data={"token": service.tokens.service()},
                                 headers={"Host": evil, "Origin": f"http://{evil}", "Sec-Fetch-Site": "same-origin"},
                                 allow_redirects=False) as resp:
        assert resp.status == 403
        assert "rt_console" not in resp.cookies


# -- the settings behind it ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "origin"), [("https://X.example:443/", "https://x.example"),
                                             ("http://a.example:8080", "http://a.example:8080"),
                                             ("https://[::1]:8443", "https://[::1]:8443")])
def test_public_origin_is_normalised_as_browsers_send_it(raw: str, origin: str) -> None:
    assert load_settings({"REALTIME_PUBLIC_ORIGIN": raw}).public_origin == origin


@pytest.mark.parametrize(("name", "raw"), [("REALTIME_PUBLIC_ORIGIN", "ftp://a.example"),
                                           ("REALTIME_PUBLIC_ORIGIN", "https://a.example/console"),
                                           ("REALTIME_TRUSTED_PROXIES", "10.0.0.0/8,not-a-network"),
                                           ("REALTIME_CONNECT_RATE", "-1"), ("REALTIME_HTTP_HEAD_TIMEOUT", "0")])
def test_bad_edge_settings_are_refused_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: raw})
