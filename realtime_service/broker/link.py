"""The one pub/sub connection of a node (PROTOCOL 5.3): subscriptions, the control channel, keepalive, reconnects.

redis-py's PubSub does not reliably resubscribe after its connection drops, so this owns a raw connection: it
reconnects with backoff, resubscribes every served diagnosis, and then has each feed catch up from its stream,
because a message published while the link was down is in the stream, not in pub/sub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from realtime_service.broker.base import ControlHandler
from realtime_service.broker.feeds import FeedSet
from realtime_service.errors import BrokerUnavailable

if TYPE_CHECKING:
    import redis.asyncio as redis

    from realtime_service.broker.redis import Events, Keys

log = logging.getLogger("realtime.broker")


class PubSubLink:
    """The pub/sub connection of this node: subscriptions, the control channel, reconnects and keepalive."""

    def __init__(self, client: redis.Redis, keys: Keys, feeds: FeedSet, events: Events, timeout: float) -> None:
        self._client = client
        self._keys = keys
        self._feeds = feeds
        self._events = events
        self._timeout = timeout
        self._keepalive = max(0.5, timeout)
        self.on_control: ControlHandler = lambda message: None
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[str, str]] | None = None  # commands for the current connection
        self._expect: dict[bytes, deque[bool]] = {}  # channel -> replies still due (True: subscribe)
        self._channel_prefix = f"{keys.prefix}:ch:".encode()
        self._control = keys.control().encode()
        self._last_seen = 0.0
        self._down_since: float | None = None  # loop time the link was last lost (None while it is up)
        self._wake = asyncio.Event()  # cuts a reconnect backoff short (Redis answered on another connection)
        self._was_up = False  # the current connection got as far as its control subscription
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def subscribe(self, diagnosis_id: int) -> None:
        feed, first = self._feeds.add(diagnosis_id)
        if first:
            self._send("SUBSCRIBE", self._keys.channel(diagnosis_id))
        if feed.ready.done():
            feed.ready.result()
            return
        loop = asyncio.get_running_loop()
        if self._down_since is not None and loop.time() - self._down_since > self._timeout:
            self._events("error", "subscribe")  # known to be down for a while: say so at once
            raise BrokerUnavailable("the broker is unavailable")
        try:
            await asyncio.wait_for(asyncio.shield(feed.ready), self._timeout)
        except TimeoutError:
            self._events("error", "subscribe")
            raise BrokerUnavailable("the broker did not confirm the subscription in time") from None

    def wake(self) -> None:
        """Redis answers again: reconnect now rather than at the end of the backoff."""
        self._wake.set()

    def unsubscribe(self, diagnosis_id: int) -> None:
        if self._feeds.remove(diagnosis_id):
            self._send("UNSUBSCRIBE", self._keys.channel(diagnosis_id))

    def _send(self, command: str, channel: str) -> None:
        if self._queue is None:
            return  # not connected: the next connection subscribes to every feed there is then
        self._expect.setdefault(channel.encode(), deque()).append(command == "SUBSCRIBE")
        self._queue.put_nowait((command, channel))

    async def _run(self) -> None:
        backoff = 0.05
        loop = asyncio.get_running_loop()
        while True:
            conn: Any = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            session: asyncio.Task[None] | None = None
            try:
                await asyncio.wait_for(conn.connect(), self._timeout)
                queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
                self._expect.clear()
                self._queue = queue
                self._was_up = False
                self._last_seen = loop.time()
                self._send("SUBSCRIBE", self._keys.control())
                for diagnosis_id in list(self._feeds.feeds):
                    self._send("SUBSCRIBE", self._keys.channel(diagnosis_id))
                session = asyncio.create_task(self._session(conn, queue))
                backoff = await self._watch(session, backoff)
                if self._was_up:
                    backoff = 0.05  # it worked until now: reconnect at once, not after the last outage's backoff
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("broker pub/sub: cannot connect (%s); retrying", type(exc).__name__)
            finally:
                self._queue = None
                self.connected.clear()
                if self._down_since is None:
                    self._down_since = loop.time()
                if session is not None and not session.done():
                    session.cancel()
                    await _reap(session)
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            self._events("reconnect", "")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, 2.0)

    async def _watch(self, session: asyncio.Task[None], backoff: float) -> float:
        """Keep the link alive: PING when idle, drop it when Redis stops answering; returns the next backoff."""
        loop = asyncio.get_running_loop()
        tick = self._keepalive / 2
        verify_every = max(1, int(5.0 / tick))
        ticks = 0
        while not session.done():
            done, _ = await asyncio.wait({session}, timeout=tick)
            if done:
                break
            ticks += 1
            idle = loop.time() - self._last_seen
            if idle > 3 * self._keepalive:
                log.warning("broker pub/sub: no answer for %.1fs; reconnecting", idle)
                session.cancel()
                break
            if self.connected.is_set():
                backoff = 0.05
            if idle >= self._keepalive and self._queue is not None:
                self._queue.put_nowait(("PING", ""))
            if ticks % verify_every == 0:
                await self._feeds_verify()
        await _reap(session)
        if session.cancelled() or session.exception() is not None:
            exc = None if session.cancelled() else session.exception()
            log.warning("broker pub/sub connection lost (%s); reconnecting",
                        type(exc).__name__ if exc else "no answer")
        return backoff

    async def _feeds_verify(self) -> None:
        """Notice history lost without any publish (a FLUSHALL), or offsets gone back (an older copy of the data):
        compare each served diagnosis's epoch and newest offset with what this node handed on."""
        feeds = [(d, f) for d, f in self._feeds.feeds.items() if f.ready.done() and f.filling is None]
        if not feeds:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for diagnosis_id, _feed in feeds:
                    pipe.hmget(self._keys.meta(diagnosis_id), "e", "o")
                metas = await asyncio.wait_for(pipe.execute(), self._timeout)
        except (RedisError, OSError, TimeoutError):
            return
        for (diagnosis_id, feed), (epoch, offset) in zip(feeds, metas, strict=True):
            if epoch is None or epoch.decode() != feed.epoch or int(offset or 0) < feed.last:
                self._feeds.fill(diagnosis_id, feed)

    async def _session(self, conn: Any, queue: asyncio.Queue[tuple[str, str]]) -> None:
        """Read and write until either side fails. A write that fails (the connection was killed) makes redis-py
        drop the socket under the reader, which may then never return: so whichever ends first ends both."""
        reader = asyncio.create_task(self._read(conn))
        writer = asyncio.create_task(self._write(conn, queue))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
            raise ConnectionError("the pub/sub connection ended")
        finally:
            for task in (reader, writer):
                task.cancel()
                await _reap(task)

    async def _read(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            reply = await conn.read_response(timeout=math.inf, push_request=True)
            self._last_seen = loop.time()
            kind = reply[0]
            if kind == b"message":
                self._dispatch(reply[1], reply[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                self._confirm(reply[1], kind == b"subscribe")

    async def _write(self, conn: Any, queue: asyncio.Queue[tuple[str, str]]) -> None:
        while True:
            command, channel = await queue.get()
            if command == "PING":
                await conn.send_command("PING")
            else:
                await conn.send_command(command, channel)

    def _confirm(self, channel: bytes, subscribed: bool) -> None:
        due = self._expect.get(channel)
        if due:
            due.popleft()
            if due:
                return  # a later (un)subscribe of the same channel is still on its way: wait for it
            del self._expect[channel]
        if not subscribed:
            return
        if channel == self._control:
            self.connected.set()
            self._was_up = True
            self._down_since = None
            return
        if channel.startswith(self._channel_prefix):
            self._feeds.confirmed(int(channel[len(self._channel_prefix):]))

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == self._control:
            try:
                self.on_control(data)
            except Exception:
                log.exception("a control message could not be handled")
            return
        if not channel.startswith(self._channel_prefix):
            return
        try:
            offset, epoch, exclude, body = data.split(b"\n", 3)
            diagnosis_id = int(channel[len(self._channel_prefix):])
            if offset == b"0":  # a personal message: epoch carries the origin node, exclude "user|session|id"
                user, session, message_id = exclude.split(b"|", 2)
                self._feeds.personal(diagnosis_id, int(user), session.decode() or None, message_id.decode(), body,
                                     epoch.decode())
                return
            self._feeds.arrive(diagnosis_id, int(offset), epoch.decode(), exclude.decode() or None, body)
        except ValueError:
            log.warning("broker pub/sub: a malformed message on %r was dropped", channel)


async def _reap(task: asyncio.Task[Any]) -> None:
    """Wait for a child task that ended or was cancelled, whatever it raised, but let this task's own
    cancellation through: swallowing it kept `stop()` waiting while the link reconnected (seen at shutdown)."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        pass
