"""`GET /ws/{diagnosis_id}`: upgrade, authenticate, admit, then read client frames (PROTOCOL 3).

The handler reads; the connection's writer task writes. Every rule about client frames is in
protocol.session; every close reason comes from errors.CloseReason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable

from aiohttp import WSMsgType, web

from realtime_service.auth.tokens import Principal
from realtime_service.connection import Connection
from realtime_service.errors import CloseReason, ServiceError, ShuttingDown
from realtime_service.node import Node
from realtime_service.outbox import Outbox
from realtime_service.protocol import frames
from realtime_service.protocol.session import (
    Ack,
    Authenticate,
    Close,
    Ping,
    Refresh,
    Reject,
    ResumeRequest,
    Session,
    parse_resume,
)
from realtime_service.web.http import diagnosis_id_of, json_error, request_token
from realtime_service.web.state import STATE, AppState
from realtime_service.web.transport import CLOSE_HANDSHAKE, WebSocketTransport

log = logging.getLogger("realtime.ws")

SEND_BUFFER_BYTES = 256 * 1024


def origin_allowed(request: web.Request, state: AppState) -> bool:
    """Browsers send Origin; it must be listed, or be the console's own origin when the console is on."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    allowed = state.settings.allowed_origins
    if origin in allowed or origin.lower() in {o.lower() for o in allowed}:
        return True
    if state.settings.console_enabled:
        own = f"{request.scheme}://{request.host}".lower()
        return origin.lower() == own
    return False


def _merge_resume(query: ResumeRequest, frame: ResumeRequest, given: frozenset[str]) -> ResumeRequest:
    """Resume fields may come in the query or the auth frame (PROTOCOL 3.7); the frame wins field by field."""
    return ResumeRequest(since=frame.since if "since" in given else query.since,
                         epoch=frame.epoch if "epoch" in given else query.epoch,
                         device=frame.device if "device" in given else query.device)


def _bound_kernel_buffer(request: web.Request) -> None:
    """Cap the kernel's send buffer, so a client that stops reading fills its outbox (and is closed
    `slow_consumer`) after a bounded amount of memory, not after megabytes of autotuned socket buffer."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


async def _close(ws: web.WebSocketResponse, reason: CloseReason) -> None:
    try:
        await asyncio.wait_for(ws.close(code=reason.code, message=reason.reason.encode()), CLOSE_HANDSHAKE)
    except (TimeoutError, ConnectionError, RuntimeError):
        pass


async def _first_frame(ws: web.WebSocketResponse, session: Session, timeout: float) -> Authenticate | CloseReason:
    """Wait for the `auth` frame (PROTOCOL 3.1); answers control frames meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return CloseReason.AUTH_TIMEOUT
        try:
            msg = await ws.receive(timeout=remaining)
        except TimeoutError:
            return CloseReason.AUTH_TIMEOUT
        if msg.type is WSMsgType.PING:
            await ws.pong(msg.data)
            continue
        if msg.type is WSMsgType.PONG:
            continue
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return CloseReason.NORMAL  # closed or errored (1009 was already sent by aiohttp)
        action = session.receive(msg.data, msg.type is WSMsgType.BINARY, loop.time())
        if isinstance(action, Authenticate):
            return action
        if isinstance(action, Close):
            return action.reason
        return CloseReason.INVALID_TOKEN


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    settings, node, metrics = state.settings, state.node, state.metrics
    diagnosis_id = diagnosis_id_of(request)
    if not origin_allowed(request, state):
        metrics.connection_attempts.labels("origin_refused").inc()
        return json_error(403, "origin_not_allowed", "this Origin may not open WebSocket connections")
    if node.draining:
        return json_error(503, ShuttingDown.code, "the service is restarting; reconnect to another node")
    token = request_token(request, allow_query=True)
    resume = parse_resume(request.query.get("since"), request.query.get("epoch"), request.query.get("device"))
    if isinstance(resume, str):
        return json_error(400, "bad_resume", resume)

    ws = web.WebSocketResponse(autoping=False, heartbeat=None, max_msg_size=settings.max_frame_bytes,
                               compress=settings.ws_compression, timeout=CLOSE_HANDSHAKE)
    await ws.prepare(request)
    _bound_kernel_buffer(request)
    loop = asyncio.get_running_loop()
    session = Session(settings.rate_limit, settings.rate_burst, loop.time(), authenticated_by_request=bool(token))
    try:
        if not token:
            first = await _first_frame(ws, session, settings.auth_timeout)
            if isinstance(first, CloseReason):
                metrics.connection_attempts.labels(first.reason or "closed").inc()
                if first is not CloseReason.NORMAL:
                    await _close(ws, first)
                return ws
            token, resume = first.token, _merge_resume(resume, first.resume, first.given)
            session.opened()
        principal = node.verify(token)
        admitted_in = await node.admit(principal, diagnosis_id)
    except ServiceError as exc:
        metrics.connection_attempts.labels(exc.close.reason).inc()
        await _close(ws, exc.close)
        return ws
    except Exception:  # the upgrade is done: answer with a close code, never an HTTP 500 on the socket
        log.exception("admitting a connection failed")
        metrics.connection_attempts.labels(CloseReason.INTERNAL_ERROR.reason).inc()
        await _close(ws, CloseReason.INTERNAL_ERROR)
        return ws
    metrics.connection_attempts.labels("accepted").inc()
    await _serve(ws, request, state, session, principal, diagnosis_id, resume, admitted_in)
    return ws


async def _serve(ws: web.WebSocketResponse, request: web.Request, state: AppState, session: Session,
                 principal: Principal, diagnosis_id: int, resume: ResumeRequest, admitted_in: int) -> None:
    """The live part of a connection: attach, read until closed, detach."""
    settings, node = state.settings, state.node
    loop = asyncio.get_running_loop()
    transport = WebSocketTransport(ws, request, state.metrics, state.flusher, direct=not settings.ws_compression)
    assert principal.user_id is not None
    conn = Connection(str(uuid.uuid4()), diagnosis_id, principal.user_id, resume.device,
                      Outbox(settings.outbox_max_bytes, settings.outbox_max_messages), transport,
                      principal.expires_at)
    transport.start(conn)
    leeway = node.verifier.leeway

    def expire() -> asyncio.TimerHandle:
        return loop.call_at(loop.time() + max(0.0, conn.expires_at + leeway - time.time()), conn.close,
                            CloseReason.TOKEN_EXPIRED)

    timer = expire()

    async def read_loop() -> None:
        nonlocal timer
        try:
            while True:
                msg = await ws.receive()
                kind = msg.type
                if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                    action = session.receive(msg.data, kind is WSMsgType.BINARY, loop.time())
                    if isinstance(action, Ping):
                        conn.reply(frames.pong_frame(diagnosis_id))
                    elif isinstance(action, Ack):
                        await node.confirm(conn, action.offset)
                    elif isinstance(action, Reject):
                        conn.reply(frames.error_frame(diagnosis_id, action.code, action.message))
                    elif isinstance(action, Refresh):
                        if _refresh(conn, principal, action.token, node.verify):
                            timer.cancel()
                            timer = expire()
                    elif isinstance(action, Close):
                        conn.close(action.reason)
                        return
                elif kind is WSMsgType.PONG:
                    await _pong(conn, node, msg.data)
                elif kind is WSMsgType.PING:
                    await ws.pong(msg.data)
                else:
                    break
        except ServiceError as exc:
            conn.close(exc.close)
        except (ConnectionError, RuntimeError):
            pass
        except Exception:
            log.exception("connection handler failed")
            conn.close(CloseReason.INTERNAL_ERROR)
        transport.peer_gone()

    reader: asyncio.Task[None] | None = None
    try:
        await node.attach(conn, resume, admitted_in)
        reader = asyncio.create_task(read_loop())
    except ServiceError as exc:
        conn.close(exc.close)
    except Exception:
        log.exception("attach failed")
        conn.close(CloseReason.INTERNAL_ERROR)
    try:
        await transport.run_until_closed(reader)
    finally:
        timer.cancel()
        session.closed()
        if conn.close_reason is None:
            conn.close(CloseReason.NORMAL)
        await node.detach(conn)


def _refresh(conn: Connection, principal: Principal, token: str, verify: Callable[[str], Principal]) -> bool:
    """An in-band token refresh (PROTOCOL 3.5): same subject, new expiry; otherwise close."""
    try:
        fresh: Principal = verify(token)
    except ServiceError as exc:
        conn.close(exc.close)
        return False
    if not fresh.same_subject(principal) or fresh.user_id != conn.user_id:
        conn.close(CloseReason.FORBIDDEN)
        return False
    conn.expires_at = fresh.expires_at
    return True


async def _pong(conn: Connection, node: Node, payload: bytes) -> None:
    """A PONG confirms every frame written before its PING (TCP delivers in order)."""
    conn.awaiting_pong = False
    try:
        seq = int(payload)
    except ValueError:
        return
    mark = conn.ping_marks.pop(seq, None)
    for older in [s for s in conn.ping_marks if s < seq]:
        del conn.ping_marks[older]
    if mark:
        await node.confirm(conn, mark)
