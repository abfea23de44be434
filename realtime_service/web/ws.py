"""`GET /ws/{diagnosis_id}`: upgrade, authenticate, admit, then read client frames (PROTOCOL 3).

The handler reads; the connection's writer task writes. Every rule about client frames is in
protocol.session; every close reason comes from errors.CloseReason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from realtime_service.auth.tokens import Principal
from realtime_service.connection import Connection
from realtime_service.errors import CloseReason, ServiceError, ShuttingDown, TooManyConnections
from realtime_service.expiry import ExpiryHeap
from realtime_service.limits import client_address, rate_key
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
from realtime_service.web.hosts import console_origin_allowed
from realtime_service.web.http import diagnosis_id_of, json_error, request_token
from realtime_service.web.state import STATE, AppState, EdgeState
from realtime_service.web.transport import CLOSE_HANDSHAKE, WebSocketTransport

log = logging.getLogger("realtime.ws")
audit = logging.getLogger("realtime.audit")

SEND_BUFFER_BYTES = 256 * 1024
NODE_FULL_RETRY = (5, 15)  # seconds a client is told to wait when this node is full, spread to avoid a herd


def origin_allowed(request: web.Request, state: AppState) -> bool:
    """Browsers send Origin; it must be listed, or be the console's own origin when the console is on (PROTOCOL
    3.9). The console's origin is the configured public origin, never taken from the request's Host alone."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    allowed = state.settings.allowed_origins
    if origin in allowed or origin.lower() in {o.lower() for o in allowed}:
        return True
    if state.settings.console_enabled:
        return console_origin_allowed(origin, request, state.settings, state.edge.known_hosts)
    return False


class _Response(web.WebSocketResponse):
    """aiohttp closes an oversized message 1009 itself, with an empty reason; give it the table's word."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == CloseReason.MESSAGE_TOO_BIG.code and not message:
            message = CloseReason.MESSAGE_TOO_BIG.reason.encode()
        return await super().close(code=code, message=message, drain=drain)


def _is_too_big(msg: object) -> bool:
    return isinstance(msg, WebSocketError) and msg.code == WSCloseCode.MESSAGE_TOO_BIG


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
        if msg.type is WSMsgType.ERROR and _is_too_big(msg.data):
            return CloseReason.MESSAGE_TOO_BIG  # aiohttp already sent the 1009
        if msg.type is WSMsgType.CLOSE:
            await _answer_close(ws)
            return CloseReason.NORMAL
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return CloseReason.NORMAL  # closed or errored
        action = session.receive(msg.data, msg.type is WSMsgType.BINARY, loop.time())
        if isinstance(action, Authenticate):
            return action
        if isinstance(action, Close):
            return action.reason
        return CloseReason.INVALID_TOKEN


async def _answer_close(ws: web.WebSocketResponse) -> None:
    """Answer the client's close frame (autoclose is off)."""
    try:
        await asyncio.wait_for(ws.close(), CLOSE_HANDSHAKE)
    except (TimeoutError, ConnectionError, RuntimeError):
        pass


def _retry_after(status: int, code: str, message: str, seconds: int) -> web.Response:
    response = json_error(status, code, message)
    response.headers["Retry-After"] = str(seconds)
    return response


def _refused(user_id: int | None, diagnosis_id: int, device: str, address: str, reason: CloseReason) -> None:
    """An authenticated user refused: worth an audit line (who tried to see which record)."""
    if user_id is not None and reason in (CloseReason.FORBIDDEN, CloseReason.DIAGNOSIS_NOT_FOUND,
                                          CloseReason.TOO_MANY_CONNECTIONS):
        audit.info("connection refused", extra={"event": "ws_refused", "user_id": user_id,
                                                "diagnosis_id": diagnosis_id, "device": device, "client": address,
                                                "close_reason": reason.reason, "close_code": reason.code})


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    settings, node, metrics, edge = state.settings, state.node, state.metrics, state.edge
    diagnosis_id = diagnosis_id_of(request)
    loop = asyncio.get_running_loop()
    address = client_address(request.remote, request.headers.getall("X-Forwarded-For", ()), edge.trusted_proxies)
    wait = edge.connect_rate.allow(rate_key(address), loop.time()) if edge.connect_rate.enabled else 0.0
    if wait:  # before any token or replica work (PROTOCOL 3.11)
        metrics.connection_attempts.labels("connect_rate_limited").inc()
        return _retry_after(429, "connect_rate_limited", "too many connection attempts from this address",
                            max(1, math.ceil(wait)))
    if not origin_allowed(request, state):
        metrics.connection_attempts.labels("origin_refused").inc()
        return json_error(403, "origin_not_allowed", "this Origin may not open WebSocket connections")
    if node.draining:
        return json_error(503, ShuttingDown.code, "the service is restarting; reconnect to another node")
    if settings.max_connections and edge.websockets >= settings.max_connections:
        metrics.connection_attempts.labels("node_full").inc()
        return _retry_after(503, "node_full", "this node holds as many connections as it may; retry later",
                            random.randint(*NODE_FULL_RETRY))
    token = request_token(request, allow_query=True)
    resume = parse_resume(request.query.get("since"), request.query.get("epoch"), request.query.get("device"))
    if isinstance(resume, str):
        return json_error(400, "bad_resume", resume)

    # autoclose off: a client's close frame is answered after the connection is released (hub, presence, the
    # per-user slot), so a client that closes and reconnects at once finds its slot free on every node.
    ws = _Response(autoping=False, autoclose=False, heartbeat=None, max_msg_size=settings.max_frame_bytes,
                   compress=settings.ws_compression, timeout=CLOSE_HANDSHAKE)
    edge.websockets += 1
    session_id = str(uuid.uuid4())
    counted: int | None = None  # the user whose per-user slot this connection holds
    try:
        await ws.prepare(request)
        _bound_kernel_buffer(request)
        session = Session(settings.rate_limit, settings.rate_burst, loop.time(),
                          authenticated_by_request=bool(token))
        principal: Principal | None = None
        try:
            if not token:
                first = await _first_frame(ws, session, settings.auth_timeout)
                if isinstance(first, CloseReason):
                    metrics.connection_attempts.labels(first.reason or "closed").inc()
                    if first not in (CloseReason.NORMAL, CloseReason.MESSAGE_TOO_BIG):
                        await _close(ws, first)
                    return ws
                token, resume = first.token, _merge_resume(resume, first.resume, first.given)
                session.opened()
            principal = node.verify(token)
            if settings.max_connections_per_user and principal.user_id is not None:
                if not await edge.counter.acquire(principal.user_id, session_id, settings.max_connections_per_user):
                    raise TooManyConnections(f"at most {settings.max_connections_per_user} connections per user")
                counted = principal.user_id
            admitted_in = await node.admit(principal, diagnosis_id)
        except ServiceError as exc:
            metrics.connection_attempts.labels(exc.close.reason).inc()
            _refused(principal.user_id if principal else None, diagnosis_id, resume.device, address, exc.close)
            await _close(ws, exc.close)
            return ws
        except Exception:  # the upgrade is done: answer with a close code, never an HTTP 500 on the socket
            log.exception("admitting a connection failed")
            metrics.connection_attempts.labels(CloseReason.INTERNAL_ERROR.reason).inc()
            await _close(ws, CloseReason.INTERNAL_ERROR)
            return ws
        metrics.connection_attempts.labels("accepted").inc()
        await _serve(ws, request, state, session, principal, diagnosis_id, resume, admitted_in, session_id, address)
        return ws
    finally:
        edge.websockets -= 1
        if counted is not None:
            await edge.counter.release(counted, session_id)


async def _serve(ws: web.WebSocketResponse, request: web.Request, state: AppState, session: Session,
                 principal: Principal, diagnosis_id: int, resume: ResumeRequest, admitted_in: int, session_id: str,
                 address: str) -> None:
    """The live part of a connection, in the handler's own task: attach, read until closed, release, close.

    No second task and no closures: the core ends the read loop through the transport (`WebSocketTransport.close`
    wakes `receive()`), so an idle connection is this coroutine, its objects and aiohttp's.
    """
    settings, node, edge = state.settings, state.node, state.edge
    loop = asyncio.get_running_loop()
    transport = WebSocketTransport(ws, request, state.metrics, state.flusher, direct=not settings.ws_compression)
    assert principal.user_id is not None
    conn = Connection(session_id, diagnosis_id, principal.user_id, resume.device,
                      Outbox(settings.outbox_max_bytes, settings.outbox_max_messages), transport,
                      principal.expires_at)
    transport.start(conn)
    leeway = node.verifier.leeway
    expiries = state.expiries
    transport.expiry = _expire(expiries, loop, conn, leeway)
    opened_at: float | None = None
    try:
        try:
            await node.attach(conn, resume, admitted_in)
            if conn.close_reason is None:
                opened_at = loop.time()
                _audit_opened(conn, address)
                await _read(ws, conn, transport, session, principal, node, expiries, leeway)
        except ServiceError as exc:
            conn.close(exc.close)
        except Exception:
            log.exception("connection handler failed" if opened_at is not None else "attach failed")
            conn.close(CloseReason.INTERNAL_ERROR)
    finally:
        # Leave the hub, presence, the counts and the per-user limit as soon as the connection is closed, before
        # the close handshake: a client dropped by the heartbeat is gone, whatever its socket still does.
        try:
            await _release(conn, transport, session, node, edge, expiries, settings.max_connections_per_user,
                           session_id, address, None if opened_at is None else loop.time() - opened_at)
        except Exception:
            log.exception("releasing a closed connection failed")
    await transport.finish()


def _expire(expiries: ExpiryHeap, loop: asyncio.AbstractEventLoop, conn: Connection, leeway: float) -> list[Any]:
    return expiries.add(loop.time() + max(0.0, conn.expires_at + leeway - time.time()),
                        functools.partial(conn.close, CloseReason.TOKEN_EXPIRED))


async def _release(conn: Connection, transport: WebSocketTransport, session: Session, node: Node, edge: EdgeState,
                   expiries: ExpiryHeap, per_user_limit: int, session_id: str, address: str,
                   duration: float | None) -> None:
    if transport.expiry is not None:
        expiries.cancel(transport.expiry)
        transport.expiry = None
    session.closed()
    if conn.close_reason is None:
        conn.close(CloseReason.NORMAL)
    try:
        await node.detach(conn)
    finally:
        if per_user_limit:
            await edge.counter.release(conn.user_id, session_id)
        if duration is not None:
            _audit_closed(conn, address, transport.outcome, duration)


async def _read(ws: web.WebSocketResponse, conn: Connection, transport: WebSocketTransport, session: Session,
                principal: Principal, node: Node, expiries: ExpiryHeap, leeway: float) -> None:
    """Read client frames until the client leaves or the core closes the connection (WAKE)."""
    diagnosis_id = conn.diagnosis_id
    loop = asyncio.get_running_loop()
    try:
        while True:
            msg = await ws.receive()
            if transport.closed:
                return  # the core closed it (WAKE, or frames that came before it): nothing more is read
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
                    if _refresh(conn, principal, action.token, node.verify) and transport.expiry is not None:
                        expiries.cancel(transport.expiry)
                        transport.expiry = _expire(expiries, loop, conn, leeway)
                elif isinstance(action, Close):
                    conn.close(action.reason)
                    return
            elif kind is WSMsgType.PONG:
                await _pong(conn, node, msg.data)
            elif kind is WSMsgType.PING:
                await ws.pong(msg.data)
            elif kind is WSMsgType.ERROR and _is_too_big(msg.data):
                conn.close(CloseReason.MESSAGE_TOO_BIG)  # aiohttp already sent the 1009
                return
            else:
                break
    except (ConnectionError, RuntimeError):
        pass
    transport.peer_gone()


def _audit_opened(conn: Connection, address: str) -> None:
    """Who watches which record, from where: one line per connection opened (never a token)."""
    audit.info("connection opened", extra={"event": "ws_open", "user_id": conn.user_id,
                                           "diagnosis_id": conn.diagnosis_id, "device": conn.device,
                                           "client": address, "session": conn.session})


def _audit_closed(conn: Connection, address: str, reason: str, duration: float) -> None:
    code = conn.close_reason.code if conn.close_reason is not None and reason != "client" else None
    audit.info("connection closed", extra={"event": "ws_close", "user_id": conn.user_id,
                                           "diagnosis_id": conn.diagnosis_id, "device": conn.device,
                                           "client": address, "session": conn.session, "close_reason": reason,
                                           "close_code": code, "duration_s": round(duration, 3)})


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
    if mark is not None:  # even at offset 0 it confirms the kept personal messages written before the PING
        await node.confirm(conn, mark)
