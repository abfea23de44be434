"""A deliberately small stand-in for `realtime-service serve`, used only to check the benchmark
harness itself (and to measure the load generator's ceiling):

    .venv/bin/python -m tests.bench.run --quick --server-cmd ".venv/bin/python -m tests.bench.fakeserver"

It reads the same REALTIME_* variables, checks the Bearer token (no ownership query), numbers
messages per diagnosis, and closes a connection 1013 `slow_consumer` when its buffer passes 1 MiB.
It is NOT the service and implements only what the benchmark touches.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import jwt
import orjson
from aiohttp import WSCloseCode, web

SECRET = os.environ.get("REALTIME_JWT_SECRET", "")
LIMIT = int(os.environ.get("REALTIME_OUTBOX_MAX_BYTES", "1048576"))


class Chan:
    def __init__(self) -> None:
        self.offset = 0
        self.conns: dict[web.WebSocketResponse, list[int]] = {}


chans: dict[int, Chan] = {}
EPOCH = uuid.uuid4().hex


def server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def bearer(request: web.Request) -> dict[str, Any] | None:
    h = request.headers.get("Authorization", "")
    if not h.startswith("Bearer "):
        return None
    try:
        claims: dict[str, Any] = jwt.decode(h[7:], SECRET, algorithms=["HS256"])
        return claims
    except jwt.PyJWTError:
        return None


async def healthz(_r: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def status(_r: web.Request) -> web.Response:
    return web.json_response(
        {
            "connections": sum(len(c.conns) for c in chans.values()),
            "diagnoses": len(chans),
            "retained_messages": 0,
        }
    )


async def ws_handler(request: web.Request) -> web.StreamResponse:
    try:
        diag = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound() from None
    claims = bearer(request)
    ws = web.WebSocketResponse(autoping=True, heartbeat=30.0)
    await ws.prepare(request)
    if claims is None:
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"invalid_token")
        return ws
    ch = chans.setdefault(diag, Chan())
    await ws.send_str(
        orjson.dumps(
            {
                "type": "connect",
                "diagnosis_id": diag,
                "data": {
                    "user_id": int(claims["sub"]),
                    "session": uuid.uuid4().hex,
                    "offset": ch.offset,
                    "epoch": EPOCH,
                    "message": "Successfully connected to diagnosis updates",
                },
                "timestamp": now_iso(),
            }
        ).decode()
    )
    ch.conns[ws] = [0]
    try:
        async for _msg in ws:
            pass
    finally:
        ch.conns.pop(ws, None)
    return ws


async def publish(request: web.Request) -> web.Response:
    if bearer(request) is None:
        return web.json_response({"error": {"code": "unauthorized", "message": "", "fields": {}}}, status=401)
    body = orjson.loads(await request.read())
    diag = int(body["diagnosis_id"])
    ch = chans.setdefault(diag, Chan())
    ch.offset += 1
    payload = orjson.dumps(
        {
            "type": body["type"],
            "diagnosis_id": diag,
            "data": body["data"],
            "timestamp": now_iso(),
            "offset": ch.offset,
            "epoch": EPOCH,
        }
    )
    # one encoded frame written straight into every transport: a "null server" that shows the
    # load generator's own ceiling
    frame = server_frame(0x1, payload)
    n = 0
    for ws in list(ch.conns):
        tr = ws._req.transport if ws._req is not None else None
        if tr is None or tr.is_closing():
            ch.conns.pop(ws, None)
            continue
        if tr.get_write_buffer_size() > LIMIT:
            ch.conns.pop(ws, None)
            tr.write(server_frame(0x8, (1013).to_bytes(2, "big") + b"slow_consumer"))
            asyncio.get_running_loop().call_later(10.0, tr.abort)
            continue
        tr.write(frame)
        n += 1
    return web.json_response({"diagnosis_id": diag, "offset": ch.offset, "epoch": EPOCH, "delivered": n})


def main() -> None:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ws/status", status)
    app.router.add_get("/ws/{id}", ws_handler)
    app.router.add_post("/api/v1/publish", publish)
    web.run_app(
        app,
        host=os.environ.get("REALTIME_HOST", "127.0.0.1"),
        port=int(os.environ.get("REALTIME_PORT", "8080")),
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
