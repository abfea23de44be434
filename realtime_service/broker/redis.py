"""The Redis broker (PROTOCOL 5): many nodes share offsets, history, cursors, inboxes and idempotency records.

Every step that must be atomic is one Lua script of `lua/`. Live publications travel over pub/sub, in the order
the publish script ran; `feeds` keeps each subscribed diagnosis gapless and in order on this node, filling a
gap from the stream and reconnecting the pub/sub connection itself (redis-py's does not resubscribe reliably).
Imported only when REALTIME_REDIS_URL is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from realtime_service.broker.base import (
    ControlHandler,
    Cursor,
    History,
    IdempotencyRecord,
    LostHandler,
    PersonalHandler,
    Publication,
    PublicationHandler,
    StreamPosition,
)
from realtime_service.broker.feeds import FeedSet
from realtime_service.broker.link import PubSubLink
from realtime_service.broker.sealing import Sealer, SealError, history_aad, personal_aad, result_aad
from realtime_service.errors import BrokerUnavailable
from realtime_service.protocol.frames import with_position

log = logging.getLogger("realtime.broker")

MAX_DEVICES_PER_USER = 64
ACTIVE_NOTE_MS = 1000
# Seconds a publish waits for the publications before it to come through pub/sub before reading them from the
# stream instead: long enough that a busy node does not add a history read to every publish.
FILL_AFTER = 0.5
SEAL_ATTEMPTS = 50  # publishes of other nodes that may overtake one sealed publish before it gives up
PUBLISH_ID_TTL_MS = 10_000  # a retried publish comes within the publish deadline; remember its id a while longer
SCRIPTS = ("publish", "position", "history", "retained", "cursor", "inbox", "idempotency", "beat", "live_nodes",
           "user_connections", "epoch_reset")
Events = Callable[[str, str], None]  # (event, detail): errors, reconnects, gap fills, catch-ups for metrics


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _new_epoch() -> str:
    return secrets.token_hex(8)


class Keys:
    """The key layout: every key of one diagnosis shares the hash tag `{<prefix>:d:<id>}` (Redis Cluster)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def tag(self, diagnosis_id: int) -> str:
        return f"{{{self.prefix}:d:{diagnosis_id}}}"

    def meta(self, diagnosis_id: int) -> str:
        return f"{self.tag(diagnosis_id)}:meta"

    def stream(self, diagnosis_id: int) -> str:
        return f"{self.tag(diagnosis_id)}:stream"

    def cursors(self, diagnosis_id: int, user_id: int) -> str:
        return f"{self.tag(diagnosis_id)}:cursor:{user_id}"

    def cursor_users(self, diagnosis_id: int) -> str:
        return f"{self.tag(diagnosis_id)}:cursor-users"

    def inbox(self, diagnosis_id: int, user_id: int) -> str:
        return f"{self.tag(diagnosis_id)}:inbox:{user_id}"

    def publish_id(self, diagnosis_id: int, publish_id: str) -> str:
        return f"{self.tag(diagnosis_id)}:publish:{publish_id}"

    def channel(self, diagnosis_id: int) -> str:
        return f"{self.prefix}:ch:{diagnosis_id}"

    def control(self) -> str:
        return f"{self.prefix}:control"

    def active(self) -> str:
        return f"{{{self.prefix}}}:active"

    def idempotency(self, scope: str, key: str) -> str:
        digest = hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()[:32]
        return f"{{{self.prefix}:i:{digest}}}"


class Scripts:
    """The Lua scripts, loaded once per connection pool; EVALSHA, falling back to loading after a Redis restart."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._source = {name: (resources.files("realtime_service.broker") / "lua" / f"{name}.lua").read_text()
                        for name in SCRIPTS}
        self._sha = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in self._source.items()}

    def sha(self, name: str) -> str:
        return self._sha[name]

    async def ensure_loaded(self, name: str) -> None:
        """Before a pipeline of EVALSHA (which cannot fall back one by one): load the script if Redis lost it."""
        if not (await self._client.script_exists(self._sha[name]))[0]:
            await self._client.script_load(self._source[name])

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._client.evalsha(self._sha[name], len(keys), *keys, *args)
        except NoScriptError:
            await self._client.script_load(self._source[name])
            return await self._client.evalsha(self._sha[name], len(keys), *keys, *args)


class RedisBroker:
    """Broker for many nodes on one Redis primary (6.2+ or Valkey)."""

    def __init__(self, url: str, *, prefix: str, history_size: int, history_max_bytes: int, history_ttl: float,
                 inbox_size: int, idempotency_ttl: float, timeout: float = 2.0,
                 clock: Callable[[], float] = time.time, events: Events | None = None,
                 sealer: Sealer | None = None) -> None:
        self.keys = Keys(prefix)
        self._history_size = history_size
        self._history_max_bytes = history_max_bytes
        self._ttl_ms = _ms(history_ttl)
        self._history_ttl = history_ttl
        self._inbox_size = inbox_size
        self._idempotency_ttl = idempotency_ttl
        self.timeout = timeout
        self._clock = clock
        self._events: Events = events or (lambda event, detail: None)
        # A command is retried twice on a broken connection (a pooled one from before a Redis restart). Every
        # script is safe to run twice: a publish carries its own id and answers a retry with the first result.
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), 2,
                      supported_errors=(RedisConnectionError, RedisTimeoutError))
        # A blocking pool: a burst of publishes waits for a free connection instead of failing "too many".
        pool = redis.BlockingConnectionPool.from_url(
            url, socket_timeout=timeout + 1.0, socket_connect_timeout=timeout, retry=retry,
            health_check_interval=0, max_connections=64, timeout=timeout)
        self.client: redis.Redis = redis.Redis(connection_pool=pool)
        self._pool = pool
        self.scripts = Scripts(self.client)
        self._noted: dict[int, int] = {}
        self._newest: dict[int, int] = {}  # newest offset this node saw per diagnosis (sealing predicts the next)
        self._sealer = sealer
        self.feeds = FeedSet(self.keys, self._fill_source, self._position_source, self._events,
                             fill_after=FILL_AFTER, timeout=timeout, opener=self._open if sealer else None,
                             reset_epoch=self._reset_epoch)
        self._link = PubSubLink(self.client, self.keys, self.feeds, self._events, timeout=timeout)

    # -- lifecycle and handlers ------------------------------------------------------------------------------
    def set_handler(self, handler: PublicationHandler) -> None:
        self.feeds.on_publication = handler

    def set_lost_handler(self, handler: LostHandler) -> None:
        self.feeds.on_lost = handler

    def set_control_handler(self, handler: ControlHandler) -> None:
        self._link.on_control = handler

    def set_personal_handler(self, handler: PersonalHandler) -> None:
        self.feeds.on_personal = handler

    async def start(self) -> None:
        self._link.start()
        with contextlib.suppress(TimeoutError):  # down at start: the node starts, not ready, and keeps trying
            await asyncio.wait_for(self._link.connected.wait(), self.timeout)

    async def close(self) -> None:
        """Each step is bounded: in the storm benchmark a node's exit sometimes waited here past its kill
        deadline (8 s), which held its port and every client's reconnect."""
        await _bounded("pub/sub link", self._link.stop())
        self.feeds.close()
        await _bounded("client", self.client.aclose())
        await _bounded("pool", self._pool.disconnect())  # a pool handed to the client is not closed by it

    def note_error(self, operation: str) -> None:
        self._events("error", operation)

    async def _call(self, operation: str, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script; any failure to get an answer in time is BrokerUnavailable (and counted)."""
        try:
            return await asyncio.wait_for(self.scripts.run(script, keys, args), self.timeout + 1.5)
        except (RedisError, OSError, TimeoutError) as exc:
            self._events("error", operation)
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None

    async def ping(self) -> None:
        """Ready means both connections work: commands, and the pub/sub link live messages arrive on."""
        try:
            await asyncio.wait_for(self.client.ping(), self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._events("error", "ping")
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None
        if not self._link.connected.is_set():
            self._link.wake()
            raise BrokerUnavailable("the broker's pub/sub link is reconnecting")

    # -- live feeds ------------------------------------------------------------------------------------------
    async def subscribe(self, diagnosis_id: int) -> None:
        await self._link.subscribe(diagnosis_id)

    async def unsubscribe(self, diagnosis_id: int) -> None:
        self._link.unsubscribe(diagnosis_id)

    async def publish_control(self, message: bytes) -> None:
        try:
            await asyncio.wait_for(self.client.publish(self.keys.control(), message), self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._events("error", "control")
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None

    async def publish_personal(self, diagnosis_id: int, user_id: int, exclude_session: str | None,
                               message_id: str, frame: bytes, origin: str) -> None:
        """Send a personal message to the nodes serving the diagnosis (they deliver it to that user's
        connections); it carries no offset, so it travels beside the broadcasts as offset 0."""
        if self._sealer is not None:
            frame = self._sealer.seal(frame, personal_aad(diagnosis_id, user_id))
        message = b"0\n%s\n%d|%s|%s\n%s" % (origin.encode(), user_id, (exclude_session or "").encode(),
                                            message_id.encode(), frame)
        try:
            await asyncio.wait_for(self.client.publish(self.keys.channel(diagnosis_id), message), self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._events("error", "personal")
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None

    # -- publishing and history ------------------------------------------------------------------------------
    async def publish(self, diagnosis_id: int, body: bytes, exclude_session: str | None = None) -> Publication:
        deadline = _ms(time.time() + self.timeout)
        now = _ms(self._clock())
        keys = (self.keys.meta(diagnosis_id), self.keys.stream(diagnosis_id),
                self.keys.publish_id(diagnosis_id, secrets.token_hex(8)))
        # A sealed body names its offset (associated data), so it is sealed for the offset this node expects next;
        # if another node took that one meanwhile, the script says which is next and it is sealed again.
        expected = self._expected_offset(diagnosis_id) if self._sealer else 0
        feed = self.feeds.feeds.get(diagnosis_id)
        known, known_epoch = (feed.last, feed.epoch) if feed is not None and feed.ready.done() else (0, "")
        for _attempt in range(SEAL_ATTEMPTS):
            stored = self._sealer.seal(body, history_aad(diagnosis_id, expected)) if self._sealer else body
            result = await self._call("publish", "publish", keys,
                                      (stored, exclude_session or "", now, self._history_size,
                                       self._history_max_bytes, self._ttl_ms, deadline, self.keys.channel(diagnosis_id),
                                       _new_epoch(), len(body), expected, PUBLISH_ID_TTL_MS, known, known_epoch))
            if int(result[0]) != -2:
                break
            expected = int(result[2]) + 1
        else:
            self._events("error", "publish")
            raise BrokerUnavailable("too many concurrent publishes to this diagnosis; nothing was published")
        if int(result[0]) < 0:
            self._events("error", "publish")
            raise BrokerUnavailable("the broker ran the publish too late; nothing was published")
        offset, epoch = int(result[0]), result[1].decode()
        self._newest[diagnosis_id] = offset
        await self._note_active(diagnosis_id, now)
        publication = Publication(diagnosis_id, offset, epoch, with_position(body, offset, epoch), exclude_session)
        self.feeds.own(publication)
        await self.feeds.wait_delivered(diagnosis_id, offset, epoch, self._link.connected.is_set())
        return publication

    def _expected_offset(self, diagnosis_id: int) -> int:
        feed = self.feeds.feeds.get(diagnosis_id)
        known = max(feed.last if feed is not None else 0, self._newest.get(diagnosis_id, 0))
        if len(self._newest) > 100_000:
            self._newest.clear()
        return known + 1

    def _open(self, sealed: bytes, aad: bytes) -> bytes | None:
        """The plaintext of a stored body, or None (counted) when it does not open: such an entry is never sent."""
        if self._sealer is None:
            return sealed
        try:
            return self._sealer.open(sealed, aad)
        except SealError as exc:
            self._events("error", "unseal")
            log.warning("a stored message could not be opened and was dropped: %s", exc)
            return None

    async def _note_active(self, diagnosis_id: int, now: int) -> None:
        """Remember which diagnoses hold history, for the status totals (best effort: not part of the publish;
        at most once a second per diagnosis, so a busy diagnosis costs no extra round trip per publish)."""
        if now - self._noted.get(diagnosis_id, -ACTIVE_NOTE_MS) < ACTIVE_NOTE_MS:
            return
        if len(self._noted) > 100_000:
            self._noted.clear()
        self._noted[diagnosis_id] = now
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.active(), {str(diagnosis_id): now})
                pipe.zremrangebyscore(self.keys.active(), "-inf", now - self._ttl_ms)
                pipe.pexpire(self.keys.active(), self._ttl_ms)
                await pipe.execute()
        except (RedisError, OSError):
            self._events("error", "active")

    async def _reset_epoch(self, diagnosis_id: int, epoch: str) -> None:
        await self._call("epoch_reset", "epoch_reset", (self.keys.meta(diagnosis_id), self.keys.stream(diagnosis_id)),
                         (epoch, _new_epoch(), self._ttl_ms))

    async def position(self, diagnosis_id: int) -> StreamPosition:
        return await self._position_source(diagnosis_id)

    async def _position_source(self, diagnosis_id: int) -> StreamPosition:
        result = await self._call("position", "position",
                                  (self.keys.meta(diagnosis_id), self.keys.stream(diagnosis_id)),
                                  (_new_epoch(), self._ttl_ms))
        return StreamPosition(int(result[0]), result[1].decode())

    async def history(self, diagnosis_id: int, since: int) -> History:
        return await self._fill_source(diagnosis_id, since)

    async def _fill_source(self, diagnosis_id: int, since: int) -> History:
        keys = (self.keys.meta(diagnosis_id), self.keys.stream(diagnosis_id))
        result: Any = await self._call("history", "history", keys,
                                       (max(0, since), _ms(self._clock()), self._ttl_ms, _new_epoch()))
        offset, epoch, oldest = int(result[0]), result[1].decode(), int(result[2])
        pubs = []
        for index in range(3, len(result), 2):
            entry_offset = int(bytes(result[index]).split(b"-", 1)[0])
            body = self._open(result[index + 1], history_aad(diagnosis_id, entry_offset))
            if body is not None:
                pubs.append(Publication(diagnosis_id, entry_offset, epoch, with_position(body, entry_offset, epoch)))
        return History(StreamPosition(offset, epoch), oldest, tuple(pubs))

    async def retained_count(self) -> int:
        now = _ms(self._clock())
        try:
            await self.client.zremrangebyscore(self.keys.active(), "-inf", now - self._ttl_ms)
            members: list[Any] = await self.client.zrange(self.keys.active(), 0, -1)
        except (RedisError, OSError) as exc:
            self._events("error", "retained")
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None
        if not members:
            return 0
        try:
            await self.scripts.ensure_loaded("retained")
            async with self.client.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.evalsha(self.scripts.sha("retained"), 1, self.keys.stream(int(member)), now, self._ttl_ms)
                counts = await asyncio.wait_for(pipe.execute(), self.timeout + 1.5)
        except (RedisError, OSError, TimeoutError) as exc:
            self._events("error", "retained")
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None
        return sum(int(c) for c in counts)

    # -- cursors -----------------------------------------------------------------------------------------------
    async def _cursor_step(self, mode: str, diagnosis_id: int, user_id: int, device: str, offset: int,
                           epoch: str) -> Cursor:
        value = await self._call(f"cursor_{mode}", "cursor",
                                 (self.keys.cursors(diagnosis_id, user_id), self.keys.cursor_users(diagnosis_id)),
                                 (mode, user_id, device, offset, epoch, _ms(self._clock()), MAX_DEVICES_PER_USER,
                                  self._ttl_ms))
        return _cursor(user_id, device, value)

    async def cursor(self, diagnosis_id: int, user_id: int, device: str) -> Cursor | None:
        try:
            value: Any = await self.client.hget(self.keys.cursors(diagnosis_id, user_id), device)
        except (RedisError, OSError) as exc:
            self._events("error", "cursor")
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None
        return None if value is None else _cursor(user_id, device, bytes(value))

    async def init_cursor(self, diagnosis_id: int, user_id: int, device: str, position: StreamPosition) -> Cursor:
        return await self._cursor_step("init", diagnosis_id, user_id, device, position.offset, position.epoch)

    async def confirm(self, diagnosis_id: int, user_id: int, device: str, offset: int, epoch: str) -> None:
        await self._cursor_step("confirm", diagnosis_id, user_id, device, offset, epoch)

    async def reset_cursor(self, diagnosis_id: int, user_id: int, device: str, position: StreamPosition) -> None:
        await self._cursor_step("reset", diagnosis_id, user_id, device, position.offset, position.epoch)

    async def cursors(self, diagnosis_id: int) -> list[Cursor]:
        try:
            users = await self.client.smembers(self.keys.cursor_users(diagnosis_id))
            out: list[Cursor] = []
            for raw in sorted(users):
                user_id = int(raw)
                entries: dict[Any, Any] = await self.client.hgetall(self.keys.cursors(diagnosis_id, user_id))
                for device, value in entries.items():
                    out.append(_cursor(user_id, bytes(device).decode(), bytes(value)))
            return out
        except (RedisError, OSError) as exc:
            self._events("error", "cursors")
            raise BrokerUnavailable(f"the broker did not answer ({type(exc).__name__})") from None

    # -- personal inboxes ----------------------------------------------------------------------------------------
    async def push_personal(self, diagnosis_id: int, user_id: int, message_id: str, frame: bytes) -> None:
        if self._sealer is not None:
            frame = self._sealer.seal(frame, personal_aad(diagnosis_id, user_id))
        entry = b"%d|%s|%s" % (_ms(self._clock()), message_id.encode(), frame)
        await self._call("push_personal", "inbox", (self.keys.inbox(diagnosis_id, user_id),),
                         ("push", self._inbox_size, self._ttl_ms, entry))

    async def kept_personal(self, diagnosis_id: int, user_id: int) -> list[tuple[str, bytes]]:
        entries = await self._call("kept_personal", "inbox", (self.keys.inbox(diagnosis_id, user_id),),
                                   ("list", 0, 0))
        horizon = _ms(self._clock()) - self._ttl_ms
        out = []
        for entry in entries:
            stamp, message_id, frame = bytes(entry).split(b"|", 2)
            if int(stamp) > horizon:
                opened = self._open(frame, personal_aad(diagnosis_id, user_id))
                if opened is not None:
                    out.append((message_id.decode(), opened))
        return out

    async def drop_personal(self, diagnosis_id: int, user_id: int, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._call("drop_personal", "inbox", (self.keys.inbox(diagnosis_id, user_id),),
                             ("drop", 0, 0, *message_ids))

    # -- idempotency ------------------------------------------------------------------------------------------------
    async def reserve_idempotency(self, scope: str, key: str, fingerprint: str, token: str,
                                  lease: float) -> IdempotencyRecord | None:
        result = await self._call("idempotency", "idempotency", (self.keys.idempotency(scope, key),),
                                  ("reserve", token, fingerprint, _ms(self._clock()), _ms(lease), ""))
        if result[0] == b"reserved":
            return None
        done, stored = result[0] == b"done", bytes(result[2])
        if done and self._sealer is not None:
            opened = self._open(stored, result_aad(self.keys.idempotency(scope, key)))
            if opened is None:  # an answer sealed with a retired key: never publish twice, ask for a retry later
                raise BrokerUnavailable("the stored answer of this Idempotency-Key cannot be read")
            stored = opened
        return IdempotencyRecord(done, result[1].decode(), stored)

    async def complete_idempotency(self, scope: str, key: str, token: str, result: bytes) -> None:
        if self._sealer is not None:
            result = self._sealer.seal(result, result_aad(self.keys.idempotency(scope, key)))
        await self._call("idempotency", "idempotency", (self.keys.idempotency(scope, key),),
                         ("complete", token, "", _ms(self._clock()), _ms(self._idempotency_ttl), result))

    async def release_idempotency(self, scope: str, key: str, token: str) -> None:
        await self._call("idempotency", "idempotency", (self.keys.idempotency(scope, key),),
                         ("release", token, "", _ms(self._clock()), 0, ""))


def _cursor(user_id: int, device: str, value: bytes) -> Cursor:
    offset, epoch, stamp = value.decode().split("|")
    return Cursor(user_id, device, int(offset), epoch, int(stamp) / 1000)


CLOSE_STEP = 2.0  # seconds one step of closing the broker may take


async def _bounded(what: str, step: Any) -> None:
    """Run one closing step for at most CLOSE_STEP. Not wait_for: that would wait again for a cancelled step
    that does not end."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=CLOSE_STEP)
    if not done:
        task.cancel()
        log.warning("closing the broker's %s took over %.0f s; the process exit ends it", what, CLOSE_STEP)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("closing the broker's %s failed: %s", what, type(task.exception()).__name__)
