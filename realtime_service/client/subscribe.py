"""`subscribe(url, diagnosis_id, token)`: follow one diagnosis as an async iterator (PROTOCOL 9).

It authenticates with the first frame (no token in a URL), resumes with the last offset and epoch on every
reconnect, hands each broadcast over once and in order, yields a HistoryLost before the messages that follow a
`recovered: false`, refreshes the token in-band before it expires, backs off by close code and raises a typed
ClientError where retrying cannot help. An offset counts as processed once the application asks for the next
item; processed offsets are acknowledged (`ack`) at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random as _random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from realtime_service.client.errors import Refused, TokenExpired, error_for
from realtime_service.client.policy import (
    ABNORMAL,
    DEFAULT_BACKOFF,
    RESUME,
    TOKEN_UNAVAILABLE,
    Backoff,
    CloseAction,
    close_action,
    reconnect_delay,
    refresh_delay,
    token_expiry,
)
from realtime_service.client.sequence import Item, Position, Resume, Sequencer, is_broadcast

TokenSource = str | Callable[[], str | Awaitable[str]]
MAX_RETRY_AFTER = 30.0
MIN_REFRESH_GAP = 1.0
CONNECT_TIMEOUT = 10.0  # seconds for TCP, TLS and the upgrade; a black-holed network is retried, not waited on
CLOSE_MESSAGES = {
    "invalid_token": "the service refused the token (signature, algorithm or claims); get a new one",
    "forbidden": "this user may not watch this diagnosis",
    "diagnosis_not_found": "there is no such diagnosis",
}


@dataclass(frozen=True, slots=True)
class State:
    """A change of the subscription's state, for `on_state`: connecting, live, reconnecting or closed."""

    state: str
    code: int | None = None
    reason: str = ""
    delay: float | None = None
    attempt: int = 0
    session: str | None = None


def socket_url(url: str, diagnosis_id: int) -> str:
    """`ws[s]://host[:port]` (or http[s]://) + `/ws/<id>`."""
    base = url.rstrip("/")
    if base.startswith("http://") or base.startswith("https://"):
        base = "ws" + base[4:]
    if not (base.startswith("ws://") or base.startswith("wss://")) or "?" in base or "#" in base:
        raise ValueError("url is the service's base: ws://, wss://, http:// or https:// without a query")
    return f"{base}/ws/{diagnosis_id}"


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (capped: a wrong header must not park a client for hours)."""
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


async def _get_token(token: TokenSource) -> str:
    value = token() if callable(token) else token
    if not isinstance(value, str):
        value = await value
    if not isinstance(value, str) or not value:
        raise ValueError("the token callable gave no token")
    return value


async def subscribe(url: str, diagnosis_id: int, token: TokenSource, device: str = "default", *,
                    position: Position | None = None, ack: bool = True, ack_interval: float = 1.0,
                    backoff: Backoff = DEFAULT_BACKOFF, heartbeat: float | None = 30.0,
                    session: aiohttp.ClientSession | None = None,
                    on_state: Callable[[State], None] | None = None,
                    on_frame: Callable[[str, dict[str, Any]], None] | None = None,
                    random: Callable[[], float] = _random.random) -> AsyncIterator[Item]:
    """Yield each broadcast and personal frame (a dict) once, and a HistoryLost where history was lost.

    `token` is a str or a callable returning one (or an awaitable of one); only a callable lets the
    subscription refresh it. `position` starts from a stored offset and epoch instead of the device's
    server-side cursor. `on_frame(direction, frame)` sees every frame in and out, with tokens masked.
    """
    if isinstance(diagnosis_id, bool) or not isinstance(diagnosis_id, int) or diagnosis_id <= 0:
        raise ValueError("diagnosis_id must be a positive integer")
    target = socket_url(url, diagnosis_id)
    sequencer = Sequencer(diagnosis_id, position)
    own_session = session is None
    http = session or aiohttp.ClientSession()
    attempt = 0

    def report(state: State) -> None:
        if on_state is not None:
            on_state(state)

    def show(direction: str, frame: dict[str, Any]) -> None:
        if on_frame is not None:
            on_frame(direction, {**frame, "token": "•••"} if "token" in frame else frame)

    try:
        while True:
            report(State("connecting", attempt=attempt))
            code, reason = ABNORMAL, ""
            retry_after = 0.0
            try:
                first = await _get_token(token)
            except Exception:  # the application's callable failed: try again later, like a failed connect
                code, reason = TOKEN_UNAVAILABLE, "token_unavailable"
                first = ""
            if first:
                since = sequencer.connecting()
                try:
                    ws = await asyncio.wait_for(
                        http.ws_connect(target, autoping=True, heartbeat=heartbeat, max_msg_size=0),
                        CONNECT_TIMEOUT)
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status in (400, 403, 404):  # refused before the upgrade: not something a retry fixes
                        reason = {403: "origin_not_allowed", 404: "diagnosis_not_found"}.get(exc.status, "refused")
                        report(State("closed", None, reason))
                        raise Refused(reason, f"HTTP {exc.status} before the upgrade", status=exc.status) from None
                    reason = f"http_{exc.status}"  # 429 or 503 (full, restarting): wait as long as it asks
                    retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                else:
                    connection = _Connection(ws, sequencer, token, first, device, since, ack, ack_interval, show)
                    first = ""
                    try:
                        async for item, live in connection.items():
                            if live is not None:
                                attempt = 0
                                report(State("live", session=live))
                                continue
                            yield item
                            connection.processed(item)
                    finally:
                        await connection.stop()
                    code, reason = connection.close_code, connection.close_reason
            action = close_action(code, reason)
            if action is CloseAction.REFRESH and not callable(token):
                report(State("closed", code, reason))
                raise TokenExpired("token_expired", "the token expired and no callable was given to refresh it",
                                   close_code=code)
            delay = reconnect_delay(action, attempt, backoff, random)
            if delay is None:
                report(State("closed", code, reason))
                raise error_for(reason, CLOSE_MESSAGES.get(reason, f"the service closed the connection {code}"),
                                close_code=code)
            delay = max(delay, retry_after)
            attempt += 1
            report(State("reconnecting", code, reason, delay, attempt))
            await asyncio.sleep(delay)
    finally:
        if own_session:
            await http.close()


class _Connection:
    """One WebSocket of a subscription: reads frames, acks what was processed, refreshes the token."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, sequencer: Sequencer, token: TokenSource, first: str,
                 device: str, since: Position | None, ack: bool, ack_interval: float,
                 show: Callable[[str, dict[str, Any]], None]) -> None:
        self.ws = ws
        self.sequencer = sequencer
        self.token = token
        self.first = first
        self.device = device
        self.since = since
        self.ack = ack
        self.ack_interval = ack_interval
        self.show = show
        self.close_code = ABNORMAL
        self.close_reason = ""
        self.processed_offset = 0
        self.acked = 0
        self.personal_pending = False
        self.exp = token_expiry(first)
        self.tasks: list[asyncio.Task[None]] = []

    async def items(self) -> AsyncIterator[tuple[Item, str | None]]:
        """(item, None) for each item to hand over; (None-like, session) once when the connection is live."""
        auth: dict[str, Any] = {"type": "auth", "token": self.first, "device": self.device}
        if self.since is not None:
            auth |= {"since": self.since.offset, "epoch": self.since.epoch}
        self.first = ""
        try:
            await self.ws.send_str(json.dumps(auth))
        except (aiohttp.ClientError, ConnectionError):
            return
        self.show("out", auth)
        del auth
        if callable(self.token) and self.exp is not None:
            self.tasks.append(asyncio.create_task(self._refresh_forever()))
        if self.ack:
            self.tasks.append(asyncio.create_task(self._ack_forever()))
        while True:
            msg = await self.ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(frame, dict):
                    continue
                self.show("in", frame)
                try:
                    found = self.sequencer.feed(frame)
                except Resume as exc:
                    await self.ws.close(code=RESUME, message=str(exc).encode())
                    self.close_code, self.close_reason = RESUME, str(exc)
                    return
                if frame.get("type") == "connect":
                    data = frame.get("data")
                    yield {}, str(data.get("session")) if isinstance(data, dict) else ""
                for item in found:
                    yield item, None
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                self.close_code = msg.data if isinstance(msg.data, int) else ABNORMAL
                self.close_reason = msg.extra if isinstance(msg.extra, str) else ""
                return
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                if self.ws.close_code is not None and self.close_code == ABNORMAL:
                    self.close_code = self.ws.close_code
                return

    def processed(self, item: Item) -> None:
        """The application asked for the next item, so it is done with this one."""
        if not isinstance(item, dict):
            return
        if is_broadcast(item):
            if item.get("epoch") == self.sequencer.epoch:
                self.processed_offset = max(self.processed_offset, int(item["offset"]))
        else:
            # The service keeps a personal message until a connection confirms it (an ack of any offset):
            # acknowledge it, so a restart of this process does not bring it back.
            self.personal_pending = True

    async def _ack_forever(self) -> None:
        while not self.ws.closed:
            await asyncio.sleep(self.ack_interval)
            await self._send_ack()

    async def _send_ack(self) -> None:
        if (self.processed_offset > self.acked or self.personal_pending) and not self.ws.closed:
            offset = max(self.processed_offset, self.acked)
            with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
                await self.ws.send_str(json.dumps({"type": "ack", "offset": offset}))
                self.show("out", {"type": "ack", "offset": offset})
                self.acked = offset
                self.personal_pending = False

    async def _refresh_forever(self) -> None:
        while not self.ws.closed and self.exp is not None:
            # At least a second apart: a token callable handing out ever-shorter tokens must not flood the socket.
            await asyncio.sleep(max(MIN_REFRESH_GAP, refresh_delay(self.exp, time.time())))
            try:
                fresh = await _get_token(self.token)
            except Exception:
                fresh = ""
            exp = token_expiry(fresh) if fresh else None
            if fresh and (exp is None or exp > self.exp):
                with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
                    await self.ws.send_str(json.dumps({"type": "auth", "token": fresh}))
                    self.show("out", {"type": "auth", "token": fresh})
                    self.exp = exp
                continue
            # No newer token yet: ask again shortly while the old one lasts; if it runs out the service closes
            # token_expired and the reconnect asks for one again.
            left = self.exp - time.time()
            if left <= 0.5:
                return
            await asyncio.sleep(min(5.0, left / 2))

    async def stop(self) -> None:
        """Acknowledge what was processed, stop the helpers and close the socket."""
        if self.ack:
            await self._send_ack()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not self.ws.closed:
            with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError, TimeoutError):
                await asyncio.wait_for(self.ws.close(), 5)



