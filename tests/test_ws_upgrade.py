"""The upgrade as the service does it itself (web.websocket): the handshake's answers, frames a client sends before
its 101 arrives, and connections still open when the service shuts down."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct

import aiohttp
import pytest

from tests.fixtures_app import Service, StartService
from tests.wsraw import RawWebSocket, encode_frame, handshake

WAIT = 10.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def test_frames_sent_with_the_upgrade_request_are_read(service: Service) -> None:
    """A client may send its auth frame and more right behind the upgrade request, in the same TCP segment,
    before the 101 arrives: none of it is lost."""
    uid, did = service.seed.owned()
    port = service.server.port
    key = base64.b64encode(os.urandom(16))
    request = (f"GET /ws/{did} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    auth = encode_frame(0x1, json.dumps({"type": "auth", "token": service.tokens.user(uid)}).encode())
    ping = encode_frame(0x1, b'{"type":"ping"}')
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request + auth + ping)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT)
            assert chunk, f"closed before the 101: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        assert {name.lower(): value for name, value in fields.items()}["sec-websocket-accept"] == accept.decode()
        raw = RawWebSocket(sock, 101, {}, extra=rest)
        first = json.loads((await raw.recv_frame(WAIT))[1])
        second = json.loads((await raw.recv_frame(WAIT))[1])
        assert (first["type"], first["diagnosis_id"]) == ("connect", did)
        assert second["type"] == "pong"
    finally:
        sock.close()


@pytest.mark.parametrize(("headers", "named"), [
    ({"Sec-WebSocket-Version": "12"}, "Sec-WebSocket-Version"),
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, "Sec-WebSocket-Key"),
    ({"Sec-WebSocket-Key": "not base64 at all!!!!!="}, "Sec-WebSocket-Key"),
    ({"Connection": "keep-alive"}, "Connection"),
])
async def test_a_bad_handshake_is_refused_naming_the_header(service: Service, headers: dict[str, str],
                                                            named: str) -> None:
    uid, did = service.seed.owned()
    url = service.ws_url(did)
    port = service.server.port
    key = base64.b64encode(os.urandom(16)).decode()
    fields = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
              "Authorization": f"Bearer {service.tokens.user(uid)}", **headers}
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        path = url.split(str(port), 1)[1]
        lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items()]
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while not data.endswith(b"}"):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    error = json.loads(body)["error"]
    assert error["code"] == "bad_handshake"
    assert named in error["message"]


async def test_shutdown_closes_open_connections_with_service_restart(start_service: StartService) -> None:
    """The service stops with connections open, one live and one still authenticating: each gets 1012
    `service_restart` (the client reconnects to another node at once), not a dropped socket."""
    service = await start_service()
    uid, did = service.seed.owned()
    live = await service.connect(did, service.tokens.user(uid))
    waiting = await handshake(service.ws_url(did))  # no token yet: it waits for its auth frame
    assert waiting.status == 101
    try:
        await service.server.close()
        await live.wait(lambda c: c.closed, "the close")
        assert (live.close_code, live.close_reason) == (1012, "service_restart")
        opcode, payload = await waiting.recv_frame(WAIT)
        assert opcode == 0x8
        assert struct.unpack("!H", payload[:2])[0] == 1012 and payload[2:] == b"service_restart"
    finally:
        waiting.close()


async def test_compression_is_negotiated_only_when_configured(start_service: StartService) -> None:
    """permessage-deflate is answered when REALTIME_WS_COMPRESSION is on, and messages still arrive."""
    for enabled in (False, True):
        service = await start_service(ws_compression=enabled)
        uid, did = service.seed.owned()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(service.ws_url(did), compress=15,
                                       headers={"Authorization": f"Bearer {service.tokens.user(uid)}"})
            try:
                assert bool(ws.compress) is enabled
                hello = await ws.receive_json(timeout=WAIT)
                assert hello["type"] == "connect"
                await ws.send_json({"type": "ping"})
                assert (await ws.receive_json(timeout=WAIT))["type"] == "pong"
            finally:
                await ws.close()
