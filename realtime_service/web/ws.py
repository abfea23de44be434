"""`GET /ws/{diagnosis_id}`: check, upgrade, authenticate, admit, attach; then read client frames (PROTOCOL 3).

The handler runs in aiohttp's request task until the connection is live, then returns: from there on the
connection is a `WebSocket` protocol (web.websocket) whose parser hands each client message to `Live`, and
nothing per connection waits in a task. Every rule about client frames is in protocol.session; every close
reason comes from errors.CloseReason.
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

from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WSMessage

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
from realtime_service.web.state import STATE, AppState
from realtime_service.web.websocket import WebSocket, handshake, hijack

log = logging.getLogger("realtime.ws")
audit = logging.getLogger("realtime.audit")

SEND_BUFFER_BYTES = 256 * 1024
SHUTDOWN_WAIT = 3.0  # seconds shutdown waits for open WebSockets to finish their close handshake
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


def _merge_resume(query: ResumeRequest, frame: ResumeRequest, given: frozenset[str]) -> ResumeRequest:
    """Resume fields may come in the query or the auth frame (PROTOCOL 3.7); the frame wins field by field."""
    return ResumeRequest(since=frame.since if "since" in given else query.since,
                         epoch=frame.epoch if "epoch" in given else query.epoch,
                         device=frame.device if "device" in given else query.device)


def _bound_kernel_buffer(transport: asyncio.BaseTransport | None) -> None:
    """Cap the kernel's send buffer, so a client that stops reading fills its outbox (and is closed
    `slow_consumer`) after a bounded amount of memory, not after megabytes of autotuned socket buffer."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


async def _first_frame(ws: WebSocket, session: Session, timeout: float) -> Authenticate | CloseReason:
    """Wait for the `auth` frame (PROTOCOL 3.1); the WebSocket answers PINGs meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return CloseReason.AUTH_TIMEOUT
        try:
            msg = await ws.receive(remaining)
        except TimeoutError:
            return CloseReason.AUTH_TIMEOUT
        if msg.type is WSMsgType.PONG:
            continue
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):  # closed: by the client, or too big a frame
            return ws.reason or CloseReason.NORMAL
        action = session.receive(msg.data, msg.type is WSMsgType.BINARY, loop.time())
        if isinstance(action, Authenticate):
            return action
        if isinstance(action, Close):
            return action.reason
        return CloseReason.INVALID_TOKEN


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


SWITCHED = 101  # what the handler returns once the socket is the service's: aiohttp only logs it


def _switched() -> web.Response:
    return web.Response(status=SWITCHED)


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
    shake = handshake(request, settings.ws_compression)
    if isinstance(shake, str):
        return json_error(400, "bad_handshake", shake)

    ws = WebSocket(loop, metrics, state.flusher, settings.max_frame_bytes, shake)
    if not hijack(request, ws, shake):
        return _switched()  # the client left before its 101: nothing to answer
    _bound_kernel_buffer(ws.transport)
    edge.websockets += 1
    state.sockets.add(ws)
    session_id = str(uuid.uuid4())
    counted: int | None = None  # the user whose per-user slot this connection holds
    handed_over = False  # once live, `Live` releases and closes it
    try:
        session = Session(settings.rate_limit, settings.rate_burst, loop.time(),
                          authenticated_by_request=bool(token))
        principal: Principal | None = None
        try:
            if not token:
                first = await _first_frame(ws, session, settings.auth_timeout)
                if isinstance(first, CloseReason):
                    metrics.connection_attempts.labels(first.reason or "closed").inc()
                    if first is not CloseReason.NORMAL:
                        ws.close(first)
                    return _switched()
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
            ws.close(exc.close)
            return _switched()
        except Exception:  # the upgrade is done: answer with a close code, never an HTTP 500 on the socket
            log.exception("admitting a connection failed")
            metrics.connection_attempts.labels(CloseReason.INTERNAL_ERROR.reason).inc()
            ws.close(CloseReason.INTERNAL_ERROR)
            return _switched()
        if ws.closed:  # the client left (or the node began to drain) while it was checked
            return _switched()
        metrics.connection_attempts.labels("accepted").inc()
        handed_over = await _attach(ws, state, session, principal, diagnosis_id, resume, admitted_in, session_id,
                                    address)
        return _switched()
    finally:
        if not handed_over:
            try:
                if counted is not None:
                    await edge.counter.release(counted, session_id)
            finally:
                await _finish(ws, state)


async def _finish(ws: WebSocket, state: AppState) -> None:
    try:
        await ws.finish()
    finally:
        state.edge.websockets -= 1
        state.sockets.discard(ws)
        if not state.sockets and state.all_closed is not None:
            state.all_closed.set()


async def _attach(ws: WebSocket, state: AppState, session: Session, principal: Principal, diagnosis_id: int,
                  resume: ResumeRequest, admitted_in: int, session_id: str, address: str) -> bool:
    """Attach the admitted connection and hand it to `Live`; False when it closed first (released here)."""
    settings, node = state.settings, state.node
    loop = asyncio.get_running_loop()
    assert principal.user_id is not None
    conn = Connection(session_id, diagnosis_id, principal.user_id, resume.device,
                      Outbox(settings.outbox_max_bytes, settings.outbox_max_messages), ws, principal.expires_at)
    ws.conn = conn
    ws.expiry = _expire(state.expiries, loop, conn, node.verifier.leeway)
    try:
        await node.attach(conn, resume, admitted_in)
    except ServiceError as exc:
        conn.close(exc.close)
    except Exception:
        log.exception("attach failed")
        conn.close(CloseReason.INTERNAL_ERROR)
    if conn.close_reason is not None:
        try:
            await _release(conn, ws, session, state, None)
        except Exception:
            log.exception("releasing a closed connection failed")
        return False
    _audit_opened(conn, address)
    ws.go_live(Live(ws, conn, state, session, principal, address, loop.time()))
    return True


class Live:
    """Reads a live connection: each client message as the parser delivers it, then its release and close.

    No task and no closures while it is open; one task runs the end (release, then the close handshake).
    """

    __slots__ = ("address", "conn", "opened_at", "principal", "session", "state", "ws")

    def __init__(self, ws: WebSocket, conn: Connection, state: AppState, session: Session, principal: Principal,
                 address: str, opened_at: float) -> None:
        self.ws = ws
        self.conn = conn
        self.state = state
        self.session = session
        self.principal = principal
        self.address = address
        self.opened_at = opened_at

    def on_message(self, msg: WSMessage) -> None:
        conn, node = self.conn, self.state.node
        kind = msg.type
        try:
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                action = self.session.receive(msg.data, kind is WSMsgType.BINARY, asyncio.get_running_loop().time())
                if isinstance(action, Ping):
                    conn.reply(frames.pong_frame(conn.diagnosis_id))
                elif isinstance(action, Ack):
                    node.confirm(conn, action.offset)
                elif isinstance(action, Reject):
                    conn.reply(frames.error_frame(conn.diagnosis_id, action.code, action.message))
                elif isinstance(action, Refresh):
                    self._refresh(action.token)
                elif isinstance(action, Close):
                    conn.close(action.reason)
            elif kind is WSMsgType.PONG:
                _pong(conn, node, msg.data)
        except ServiceError as exc:
            conn.close(exc.close)
        except Exception:
            log.exception("connection handler failed")
            conn.close(CloseReason.INTERNAL_ERROR)

    def _refresh(self, token: str) -> None:
        ws, state = self.ws, self.state
        if _refresh(self.conn, self.principal, token, state.node.verify) and ws.expiry is not None:
            state.expiries.cancel(ws.expiry)
            ws.expiry = _expire(state.expiries, asyncio.get_running_loop(), self.conn, state.node.verifier.leeway)

    def ended(self) -> None:
        task = asyncio.get_running_loop().create_task(self._end())
        closing = self.state.closing
        closing.add(task)
        task.add_done_callback(closing.discard)

    async def _end(self) -> None:
        # Leave the hub, presence, the counts and the per-user limit as soon as the connection is closed, before
        # the close handshake: a client dropped by the heartbeat is gone, whatever its socket still does.
        try:
            await _release(self.conn, self.ws, self.session, self.state,
                           asyncio.get_running_loop().time() - self.opened_at, self.address)
        except Exception:
            log.exception("releasing a closed connection failed")
        await _finish(self.ws, self.state)


def _expire(expiries: ExpiryHeap, loop: asyncio.AbstractEventLoop, conn: Connection, leeway: float) -> list[Any]:
    return expiries.add(loop.time() + max(0.0, conn.expires_at + leeway - time.time()),
                        functools.partial(conn.close, CloseReason.TOKEN_EXPIRED))


async def _release(conn: Connection, ws: WebSocket, session: Session, state: AppState, duration: float | None,
                   address: str = "") -> None:
    if ws.expiry is not None:
        state.expiries.cancel(ws.expiry)
        ws.expiry = None
    session.closed()
    if conn.close_reason is None:
        conn.close(CloseReason.NORMAL)
    try:
        await state.node.detach(conn)
    finally:
        if state.settings.max_connections_per_user:
            await state.edge.counter.release(conn.user_id, conn.session)
        if duration is not None:
            _audit_closed(conn, address, ws.outcome, duration)


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


def _pong(conn: Connection, node: Node, payload: bytes) -> None:
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
        node.confirm(conn, mark)


async def close_sockets(app: web.Application) -> None:
    """On shutdown, close what is still open (`service_restart`) and give the close handshakes a bounded time:
    aiohttp's own shutdown no longer sees these connections."""
    state = app[STATE]
    for ws in list(state.sockets):
        if ws.conn is not None:
            ws.conn.close(CloseReason.SERVICE_RESTART)
        else:
            ws.close(CloseReason.SERVICE_RESTART)
    if state.sockets:
        state.all_closed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.all_closed.wait(), SHUTDOWN_WAIT)
    for ws in list(state.sockets):
        ws.abort()
