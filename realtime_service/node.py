"""The core of one node: admits connections, resumes them, publishes, answers the read endpoints, drains.

It composes the broker (offsets, history, cursors), the hub (local fan-out) and the ownership checker; it knows
nothing of HTTP. The connect/resume seam registers the connection *before* reading history and merges by offset,
so a publish racing a reconnect is neither lost nor sent twice (PROTOCOL 3.7).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from realtime_service.auth.ownership import OwnershipChecker
from realtime_service.auth.tokens import Principal, TokenVerifier
from realtime_service.broker.base import Broker, Publication
from realtime_service.cluster import Cluster, LocalCluster, Revoke, decode_control
from realtime_service.connection import Connection, Phase
from realtime_service.errors import (
    BodyTooLarge,
    BrokerUnavailable,
    CloseReason,
    Forbidden,
    OwnershipUnavailable,
    ShuttingDown,
    ValidationFailed,
)
from realtime_service.hub import Hub
from realtime_service.idempotency import Idempotency
from realtime_service.metrics import Metrics
from realtime_service.protocol import frames
from realtime_service.protocol.models import PublishBody, PublishResult
from realtime_service.protocol.session import ResumeRequest

log = logging.getLogger("realtime.node")

DRAIN_TICK = 0.05
POSITION_OVERHEAD = 64  # bytes `with_position` may add to a body: offset and epoch
# Connections between admission and `connect` at once. In a reconnect storm thousands arrive within a second; each
# attach makes a few broker round trips, and with all of them under way at once each waits so long for the broker's
# connection pool (and a CPU-bound loop) that it times out (1013 broker_unavailable), its client retries, and the
# node never catches up (measured: 18,000 refusals and 23 s to bring 5,000 clients back). Waiting here instead is
# cheap: an open socket and a suspended coroutine, and the ones under way finish within their deadlines.
ATTACH_CONCURRENCY = 128


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits the node applies."""

    outbox_max_bytes: int
    outbox_max_messages: int
    history_max_bytes: int = 1 << 20


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Node:
    """One node's realtime core."""

    def __init__(self, broker: Broker, ownership: OwnershipChecker, verifier: TokenVerifier, metrics: Metrics,
                 limits: Limits, cluster: Callable[[Hub], Cluster] | None = None) -> None:
        self.broker = broker
        self.ownership = ownership
        self.verifier = verifier
        self.metrics = metrics
        self.limits = limits
        self.hub = Hub()
        self.cluster: Cluster = (cluster or (lambda hub: LocalCluster(hub, uuid.uuid4().hex[:12])))(self.hub)
        self.draining = False
        self._delivered: dict[tuple[int, int], int] = {}
        self._idempotency = Idempotency(broker)
        self._inflight_publishes = 0
        self._publishes_done = asyncio.Event()
        self._publishes_done.set()
        self._background: set[asyncio.Task[None]] = set()
        self._attaching = asyncio.Semaphore(ATTACH_CONCURRENCY)
        broker.set_handler(self._on_publication)
        broker.set_lost_handler(self._on_lost)
        broker.set_control_handler(self._on_control)
        broker.set_personal_handler(self._on_personal)
        metrics.track_outbox_bytes(self._outbox_bytes)

    # -- fan-out -------------------------------------------------------------------------------
    def _on_publication(self, publication: Publication) -> None:
        started = time.perf_counter()
        count = self.hub.fanout(publication.diagnosis_id, publication.frame, publication.offset,
                                publication.exclude_session)
        self._delivered[(publication.diagnosis_id, publication.offset)] = count
        if len(self._delivered) > 10_000:  # answers nobody collected (publishes of other nodes)
            self._delivered.clear()
        self.metrics.deliveries.inc(count)
        self.metrics.fanout_seconds.observe(time.perf_counter() - started)

    def _on_lost(self, diagnosis_id: int, epoch: str | None) -> None:
        """The broker could not keep this diagnosis's live history whole: its clients reconnect and resume, and
        learn from `recovered` what is gone (PROTOCOL 5.3). Connections already in the new epoch stay."""
        for conn in self.hub.connections(diagnosis_id):
            if epoch is None or conn.epoch != epoch:
                conn.close(CloseReason.SERVICE_RESTART)

    def _on_personal(self, diagnosis_id: int, user_id: int, exclude_session: str | None, message_id: str,
                     frame: bytes, origin: str) -> None:
        """A personal message another node published for a user it saw connected here."""
        if origin == self.cluster.node_id:
            return
        delivered = self.hub.fanout(diagnosis_id, frame, None, exclude_session, user_id)
        self.metrics.deliveries.inc(delivered)
        if delivered == 0 and not self._has_live(diagnosis_id, user_id):
            # that connection left meanwhile: keep the message for the user's next connection (PROTOCOL 3.8)
            task = asyncio.create_task(self.broker.push_personal(diagnosis_id, user_id, message_id, frame))
            self._background.add(task)
            task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:  # for tasks whose failure is worth a line
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a personal message could not be kept: %s", task.exception())

    def _has_live(self, diagnosis_id: int, user_id: int) -> bool:
        return any(c.user_id == user_id and c.phase is not Phase.CLOSED for c in self.hub.connections(diagnosis_id))

    def _on_control(self, message: bytes) -> None:
        revoke = decode_control(message)
        if revoke is None or revoke.origin == self.cluster.node_id:
            return
        self.ownership.forget(revoke.diagnosis_id)
        self._close_revoked(revoke)

    def _close_revoked(self, revoke: Revoke) -> int:
        closed = 0
        for conn in self.hub.connections(revoke.diagnosis_id):
            if revoke.user_id is not None and conn.user_id != revoke.user_id:
                continue
            if revoke.unavailable:
                conn.close(CloseReason.OWNERSHIP_UNAVAILABLE)  # fail closed: checked afresh on reconnect
            elif revoke.owner is None:
                conn.close(CloseReason.DIAGNOSIS_NOT_FOUND)
            elif conn.user_id != revoke.owner:
                conn.close(CloseReason.FORBIDDEN)
            else:
                continue
            closed += 1
        return closed

    def _outbox_bytes(self) -> float:
        return float(sum(conn.outbox.bytes for conn in self.hub.all()))

    # -- connections ---------------------------------------------------------------------------
    def verify(self, token: str) -> Principal:
        return self.verifier.verify(token)

    async def admit(self, principal: Principal, diagnosis_id: int) -> int:
        """Fail closed: raises unless the replica says this user owns the diagnosis.

        Returns the ownership generation the decision was made in, for `attach`.
        """
        generation = self.ownership.generation
        await self.ownership.require_watcher(principal, diagnosis_id)
        return generation

    async def attach(self, conn: Connection, resume: ResumeRequest, admitted_in: int | None = None) -> None:
        """Register, then send `connect`, the replay (3.7) and personal messages (3.8), then go live.

        At most ATTACH_CONCURRENCY at once; the others wait their turn (a storm is absorbed, not refused).
        """
        async with self._attaching:
            await self._attach(conn, resume, admitted_in)

    async def _attach(self, conn: Connection, resume: ResumeRequest, admitted_in: int | None) -> None:
        diagnosis_id, user_id = conn.diagnosis_id, conn.user_id
        if self.draining:  # admitted while the drain started (auth frame or replica still pending)
            raise ShuttingDown("the service is restarting; reconnect to another node")
        self.hub.add(conn)
        self.metrics.connections.set(self.hub.count)
        conn.subscribed = True  # one reference per connection: the broker subscribes on the first
        await self.broker.subscribe(diagnosis_id)
        await self.cluster.joined(diagnosis_id)
        # A revoke that ran while this connection was being admitted could not see it (not yet registered):
        # check again, now that any later revoke will.
        if (admitted_in is not None and admitted_in != self.ownership.generation
                and await self.ownership.owner_of(diagnosis_id) != user_id):
            raise Forbidden(f"not allowed to watch diagnosis {diagnosis_id}")
        replay: list[bytes] | None = None
        recovered = True
        if resume.since is not None:
            history = await self.broker.history(diagnosis_id, resume.since)
            position = history.position
            recovered = (resume.epoch == position.epoch
                         and history.oldest - 1 <= resume.since <= position.offset)
            if not recovered and resume.since >= history.oldest:
                history = await self.broker.history(diagnosis_id, 0)
                position = history.position
            replay = [p.frame for p in history.publications]
            await self.broker.init_cursor(diagnosis_id, user_id, conn.device, position)
        else:
            position = await self.broker.position(diagnosis_id)
            cursor = await self.broker.init_cursor(diagnosis_id, user_id, conn.device, position)
            if cursor.epoch != position.epoch:
                history = await self.broker.history(diagnosis_id, 0)
                position, recovered = history.position, False
                replay = [p.frame for p in history.publications]
            elif cursor.offset < position.offset:
                history = await self.broker.history(diagnosis_id, cursor.offset)
                position = history.position
                recovered = history.oldest - 1 <= cursor.offset
                replay = [p.frame for p in history.publications]
        kept = await self.broker.kept_personal(diagnosis_id, user_id)
        # The whole frame stays within history_max_bytes, so a client with a bounded message size can always
        # resume; kept messages that do not fit stay kept for the next connection (its replay is shorter then).
        room = self.limits.history_max_bytes - frames.REPLAY_OVERHEAD - sum(map(frames.replay_size, replay or ()))
        personal: list[bytes] = []
        sent: list[str] = []
        for message_id, frame in kept:
            room -= frames.replay_size(frame)
            if room < 0:
                break
            personal.append(frame)
            sent.append(message_id)
        conn.kept = tuple(sent)  # they leave the inbox once confirmed
        conn.epoch = position.epoch
        first = [frames.connect_frame(diagnosis_id, user_id, conn.session, position.offset, position.epoch)]
        if resume.since is not None or replay or personal:
            first.append(frames.reconnect_frame(diagnosis_id, [*(replay or []), *personal], recovered))
        conn.go_live(first, position.offset)

    async def detach(self, conn: Connection) -> None:
        if self.hub.remove(conn) or self.hub.connections(conn.diagnosis_id):
            self.cluster.changed(conn.diagnosis_id)
        self.metrics.connections.set(self.hub.count)
        if conn.subscribed:
            conn.subscribed = False
            try:
                await self.broker.unsubscribe(conn.diagnosis_id)
            except Exception:  # the broker logs and counts its own failures
                log.warning("unsubscribe failed for a diagnosis", exc_info=True)

    def confirm(self, conn: Connection, offset: int) -> None:
        """The client has everything up to `offset` (ack, or a PONG after those frames were written), and the kept
        personal messages it was sent, once they were written.

        The cursor is written in the background, one write per connection at a time (later confirmations
        coalesce): a slow or paused broker must not stall the reader, or its PONGs would go unread and the
        connection would be dropped as silent.
        """
        if conn.kept and conn.kept_written:
            self._drop_kept(conn)
        offset = min(offset, conn.highest_sent)
        if offset <= 0 or not conn.epoch:
            return
        if conn.confirming is not None:
            conn.confirm_next = max(conn.confirm_next, offset)
            return
        task = asyncio.create_task(self._write_cursor(conn, offset))
        conn.confirming = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _drop_kept(self, conn: Connection) -> None:
        """The kept personal messages this connection was sent reached it: they leave the inbox (PROTOCOL 3.8).
        If the broker cannot be told, they stay and come again on the next connection (same message_id)."""
        message_ids, conn.kept = conn.kept, ()
        task = asyncio.create_task(self.broker.drop_personal(conn.diagnosis_id, conn.user_id, message_ids))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    async def _write_cursor(self, conn: Connection, offset: int) -> None:
        try:
            while True:
                try:
                    await self.broker.confirm(conn.diagnosis_id, conn.user_id, conn.device, offset, conn.epoch)
                except BrokerUnavailable:
                    # The connection stays open (PROTOCOL 5.3); the cursor moves with the next confirmation.
                    log.debug("cursor not moved: the broker is unavailable")
                following, conn.confirm_next = conn.confirm_next, 0
                if following <= offset:
                    return
                offset = following
        finally:
            conn.confirming = None

    def heartbeat_tick(self) -> None:
        """Drop connections that did not answer the previous PING; PING the rest (PROTOCOL 3.6)."""
        for conn in self.hub.all():
            if conn.phase is Phase.SYNCING:
                continue  # not live yet (its reader starts after the replay); attach has its own time bounds
            if conn.awaiting_pong:
                conn.close(CloseReason.HEARTBEAT_TIMEOUT)
            else:
                conn.ping()

    # -- publishing ----------------------------------------------------------------------------
    async def check_publish(self, principal: Principal, body: PublishBody) -> None:
        """Everything that can refuse a publish, before anything is published."""
        await self.ownership.require_publisher(principal, body.diagnosis_id)
        target = body.personal_user()
        if target is not None and not await self.ownership.may_watch(target, body.diagnosis_id):
            raise ValidationFailed("user_id may not watch this diagnosis; the message could never be delivered",
                                   {"user_id": "may not watch this diagnosis"})

    async def publish(self, body: PublishBody) -> PublishResult:
        """Publish one checked message; answers once it is in history and handed to local outboxes."""
        self._inflight_publishes += 1
        self._publishes_done.clear()
        try:
            return await self._publish(body)
        finally:
            self._inflight_publishes -= 1
            if self._inflight_publishes == 0:
                self._publishes_done.set()

    async def _publish(self, body: PublishBody) -> PublishResult:
        diagnosis_id = body.diagnosis_id
        target = body.personal_user()
        if target is not None:
            message_id = frames.new_message_id()
            frame = frames.personal_frame(body.frame_type(), diagnosis_id, target, body.frame_data(), message_id)
            if frames.replay_size(frame) > self.limits.history_max_bytes - frames.REPLAY_OVERHEAD:
                raise BodyTooLarge(f"the message is larger than a replay may carry ({self.limits.history_max_bytes} "
                                   "bytes, REALTIME_HISTORY_MAX_BYTES)", {"data": "too large to be kept"})
            # Every broker step first: if one fails (503), nothing of the message went anywhere.
            position = await self.broker.position(diagnosis_id)
            here = self._has_live(diagnosis_id, target)
            elsewhere = await self.cluster.user_elsewhere(diagnosis_id, target)
            if elsewhere:
                await self.broker.publish_personal(diagnosis_id, target, body.exclude_session, message_id, frame,
                                                   self.cluster.node_id)
            elif not here:
                await self.broker.push_personal(diagnosis_id, target, message_id, frame)
            delivered = self.hub.fanout(diagnosis_id, frame, None, body.exclude_session, target)
            self.metrics.publishes.labels("personal").inc()
            self.metrics.deliveries.inc(delivered)
            return PublishResult(diagnosis_id=diagnosis_id, offset=None, epoch=position.epoch, delivered=delivered)
        body_bytes = frames.broadcast_body(body.frame_type(), diagnosis_id, body.frame_data())
        if frames.replay_size(body_bytes) + POSITION_OVERHEAD > self.limits.history_max_bytes - frames.REPLAY_OVERHEAD:
            # History could not hold it, so a client that reconnects would miss it: refuse rather than lose it.
            raise BodyTooLarge(f"the message is larger than the history may hold ({self.limits.history_max_bytes} "
                               "bytes, REALTIME_HISTORY_MAX_BYTES)", {"data": "too large to be kept in history"})
        publication = await self.broker.publish(diagnosis_id, body_bytes, body.exclude_session)
        delivered_count = self._delivered.pop((diagnosis_id, publication.offset), None)
        self.metrics.publishes.labels("broadcast").inc()
        return PublishResult(diagnosis_id=diagnosis_id, offset=publication.offset, epoch=publication.epoch,
                             delivered=delivered_count)

    async def idempotent(self, scope: str, key: str | None, fingerprint: str,
                         produce: Callable[[], Awaitable[bytes]]) -> bytes:
        """Run `produce` once per Idempotency-Key over every node (PROTOCOL 4, 5.2); see idempotency.py."""
        return await self._idempotency.run(scope, key, fingerprint, produce)

    # -- read endpoints --------------------------------------------------------------------------
    async def status(self, detail: bool) -> dict[str, Any]:
        """Totals over every live node (PROTOCOL 5.2); with `detail`, per diagnosis too."""
        connections, diagnoses, per_users = await self.cluster.totals()
        body: dict[str, Any] = {"connections": connections, "diagnoses": len(diagnoses),
                                "retained_messages": await self.broker.retained_count()}
        if detail:
            per: dict[str, Any] = {}
            for diagnosis_id in sorted(diagnoses):
                users = per_users.get(diagnosis_id, {})
                position = await self.broker.position(diagnosis_id)
                per[str(diagnosis_id)] = {"connections": sum(count for count, _ in users.values()),
                                          "users": len(users), "offset": position.offset}
            body["per_diagnosis"] = per
        return body

    async def presence(self, diagnosis_id: int) -> dict[str, Any]:
        await self.ownership.require_exists(diagnosis_id)
        users = await self.cluster.users(diagnosis_id)
        return {"diagnosis_id": diagnosis_id,
                "users": [{"user_id": user, "connections": count, "devices": devices}
                          for user, (count, devices) in sorted(users.items())]}

    async def deliveries(self, diagnosis_id: int) -> dict[str, Any]:
        await self.ownership.require_exists(diagnosis_id)
        position = await self.broker.position(diagnosis_id)
        devices = [{"user_id": c.user_id, "device": c.device, "confirmed_offset": c.offset,
                    "confirmed_at": iso(c.confirmed_at)}
                   for c in await self.broker.cursors(diagnosis_id) if c.epoch == position.epoch]
        devices.sort(key=lambda d: (d["user_id"], d["device"]))
        return {"diagnosis_id": diagnosis_id, "offset": position.offset, "epoch": position.epoch,
                "devices": devices}

    async def revoke(self, diagnosis_id: int, user_id: int | None) -> dict[str, Any]:
        """Forget the cached decision and close the connections the replica no longer allows, on every node."""
        self.ownership.forget(diagnosis_id)
        try:
            owner = await self.ownership.owner_of(diagnosis_id)
        except OwnershipUnavailable:
            decision = Revoke(self.cluster.node_id, diagnosis_id, user_id, None, unavailable=True)
            self._close_revoked(decision)
            await self._announce(decision)
            raise
        decision = Revoke(self.cluster.node_id, diagnosis_id, user_id, owner)
        closed = self._close_revoked(decision)
        await self._announce(decision)
        if owner is None:
            await self.ownership.require_exists(diagnosis_id)
        return {"diagnosis_id": diagnosis_id, "closed": closed}

    async def _announce(self, revoke: Revoke) -> None:
        try:
            await self.broker.publish_control(revoke.encode())
        except BrokerUnavailable:
            # This node closed its own; other nodes' caches expire within ownership_cache_ttl and their
            # connections are not closed: tell the caller, who retries.
            raise BrokerUnavailable("closed here, but the other nodes could not be told; retry the revoke") from None

    # -- shutdown ------------------------------------------------------------------------------
    async def drain(self, period: float) -> None:
        """Close every client `service_restart`, in batches spread over `period` with jitter."""
        self.draining = True
        conns = list(self.hub.all())
        random.shuffle(conns)
        if not conns:
            return
        loop = asyncio.get_running_loop()
        ticks = max(1, int(period / DRAIN_TICK))
        per_tick = max(1, math.ceil(len(conns) / ticks))
        started = loop.time()
        for index in range(0, len(conns), per_tick):
            due = started + (index // per_tick) * DRAIN_TICK + random.uniform(0, DRAIN_TICK / 2)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for conn in conns[index:index + per_tick]:
                conn.close(CloseReason.SERVICE_RESTART)

    async def wait_publishes(self, timeout: float) -> bool:
        """Wait for in-flight publishes to finish; False if some did not within `timeout`."""
        try:
            await asyncio.wait_for(self._publishes_done.wait(), timeout)
            return True
        except TimeoutError:
            return False
