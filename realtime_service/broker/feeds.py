"""Live publications from Redis, kept gapless and in order per diagnosis on this node (PROTOCOL 5.3).

`FeedSet` is the per-diagnosis sequencer: it hands publication N+1 on only after N, drops repeats, fills a gap
from the stream, and tells the node when it cannot (a new epoch, or history trimmed past the gap). The pub/sub
connection that feeds it is `link.PubSubLink`. A subscription counts as made only once Redis confirmed it *and*
a baseline position was read after that, so a publish that starts after `subscribe` returns is always seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from realtime_service.broker.base import (
    History,
    LostHandler,
    PersonalHandler,
    Publication,
    PublicationHandler,
    StreamPosition,
)
from realtime_service.broker.sealing import history_aad, personal_aad
from realtime_service.errors import BrokerUnavailable
from realtime_service.protocol.frames import with_position

if TYPE_CHECKING:

    from realtime_service.broker.redis import Events, Keys

log = logging.getLogger("realtime.broker")

MAX_PENDING = 10_000  # publications one diagnosis may hold back while waiting for a gap to be filled
FillSource = Callable[[int, int], Awaitable[History]]
Opener = Callable[[bytes, bytes], "bytes | None"]  # (sealed body, associated data) -> plaintext or None
PositionSource = Callable[[int], Awaitable[StreamPosition]]


class Feed:
    """One subscribed diagnosis: how far this node has handed it on, and what waits to be."""

    __slots__ = ("baselining", "epoch", "filling", "last", "pending", "ready", "refill", "refs", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.refs = 0
        self.ready: asyncio.Future[None] = loop.create_future()  # confirmed and baselined
        self.epoch = ""
        self.last = 0
        self.pending: dict[int, Publication] = {}  # arrived early: before the baseline, or after a gap
        self.filling: asyncio.Task[None] | None = None
        self.baselining: asyncio.Task[None] | None = None
        self.refill = False
        self.waiters: dict[int, list[asyncio.Future[None]]] = {}


class FeedSet:
    """Every diagnosis this node is subscribed to, with reference counts (one per local connection)."""

    def __init__(self, keys: Keys, fill_source: FillSource, position_source: PositionSource, events: Events,
                 fill_after: float, timeout: float, opener: Opener | None = None,
                 reset_epoch: Callable[[int, str], Awaitable[None]] | None = None) -> None:
        self.keys = keys
        self.feeds: dict[int, Feed] = {}
        self.on_publication: PublicationHandler = lambda publication: None
        self.on_lost: LostHandler = lambda diagnosis_id, epoch: None
        self.on_personal: PersonalHandler = lambda diagnosis_id, user_id, exclude, message_id, frame, origin: None
        self._fill_source = fill_source
        self._position_source = position_source
        self._events = events
        self._fill_after = fill_after
        self._timeout = timeout
        self._opener = opener
        self._reset_epoch = reset_epoch

    # -- membership ----------------------------------------------------------------------------------------
    def add(self, diagnosis_id: int) -> tuple[Feed, bool]:
        """One more local connection; True when the diagnosis was not subscribed yet."""
        feed = self.feeds.get(diagnosis_id)
        first = feed is None
        if feed is None:
            feed = self.feeds[diagnosis_id] = Feed(asyncio.get_running_loop())
        feed.refs += 1
        return feed, first

    def remove(self, diagnosis_id: int) -> bool:
        """One local connection fewer; True when it was the last (the caller unsubscribes)."""
        feed = self.feeds.get(diagnosis_id)
        if feed is None:
            return False
        feed.refs -= 1
        if feed.refs > 0:
            return False
        del self.feeds[diagnosis_id]
        self._retire(feed)
        return True

    def _retire(self, feed: Feed) -> None:
        for task in (feed.filling, feed.baselining):
            if task is not None:
                task.cancel()
        if not feed.ready.done():
            feed.ready.set_exception(BrokerUnavailable("unsubscribed before the subscription was made"))
            feed.ready.exception()  # retrieved: nobody may be waiting any more
        self._release_waiters(feed, math.inf)

    def close(self) -> None:
        for feed in self.feeds.values():
            self._retire(feed)
        self.feeds.clear()

    # -- arrivals ------------------------------------------------------------------------------------------
    def confirmed(self, diagnosis_id: int) -> None:
        """Redis confirmed the subscription (first time, or after a reconnect): baseline or catch up."""
        feed = self.feeds.get(diagnosis_id)
        if feed is None:
            return
        if not feed.ready.done():
            if feed.baselining is None:
                feed.baselining = asyncio.create_task(self._baseline(diagnosis_id, feed))
        else:
            self._events("catchup", "")
            self.fill(diagnosis_id, feed)

    def arrive(self, diagnosis_id: int, offset: int, epoch: str, exclude_session: str | None, body: bytes) -> None:
        """A publication from pub/sub (called synchronously by the link, in publish order)."""
        feed = self.feeds.get(diagnosis_id)
        if feed is None:
            return
        if self._opener is not None:
            opened = self._opener(body, history_aad(diagnosis_id, offset))
            if opened is None:
                # Never sent; the stream holds the same sealed entry, which a fill skips as well.
                if feed.ready.done() and feed.filling is None and offset == feed.last + 1 and epoch == feed.epoch:
                    feed.last = offset
                    self._drain(diagnosis_id, feed)
                return
            body = opened
        publication = Publication(diagnosis_id, offset, epoch, with_position(body, offset, epoch), exclude_session)
        if len(feed.pending) >= MAX_PENDING:
            # far behind (a fill that cannot finish): what waits here is in the stream too, so let it go and
            # let the next fill read it from there instead of holding it in memory
            feed.pending.clear()
        if not feed.ready.done() or feed.filling is not None:
            feed.pending[offset] = publication
            if feed.filling is not None:
                feed.refill = True
            return
        if epoch != feed.epoch:
            feed.pending[offset] = publication
            self.fill(diagnosis_id, feed)
            return
        if offset <= feed.last:
            return
        if offset == feed.last + 1:
            self._hand(feed, publication)
            if feed.pending:
                self._drain(diagnosis_id, feed)
            return
        feed.pending[offset] = publication
        self.fill(diagnosis_id, feed)

    def personal(self, diagnosis_id: int, user_id: int, exclude_session: str | None, message_id: str,
                 body: bytes, origin: str) -> None:
        """A personal message from pub/sub, for a subscribed diagnosis."""
        if diagnosis_id not in self.feeds:
            return
        if self._opener is not None:
            opened = self._opener(body, personal_aad(diagnosis_id, user_id))
            if opened is None:
                return
            body = opened
        self.on_personal(diagnosis_id, user_id, exclude_session, message_id, body, origin)

    def _hand(self, feed: Feed, publication: Publication) -> None:
        feed.last = publication.offset
        try:
            self.on_publication(publication)
        finally:
            if feed.waiters:
                self._release_waiters(feed, feed.last)

    def _release_waiters(self, feed: Feed, up_to: float) -> None:
        for offset in [o for o in feed.waiters if o <= up_to]:
            for waiter in feed.waiters.pop(offset):
                if not waiter.done():
                    waiter.set_result(None)

    def _drain(self, diagnosis_id: int, feed: Feed) -> bool:
        """Hand on what waited in order; True when a gap remains (something newer than last + 1 waits)."""
        while feed.pending:
            nxt = min(feed.pending)
            publication = feed.pending[nxt]
            if nxt <= feed.last or publication.epoch != feed.epoch:
                del feed.pending[nxt]
                continue
            if nxt != feed.last + 1:
                return True
            del feed.pending[nxt]
            self._hand(feed, publication)
        return False

    # -- baseline and filling --------------------------------------------------------------------------------
    async def _baseline(self, diagnosis_id: int, feed: Feed) -> None:
        try:
            position = await self._position_source(diagnosis_id)
        except BrokerUnavailable:
            feed.baselining = None  # the link's next confirmation tries again; subscribers time out meanwhile
            return
        feed.baselining = None
        if self.feeds.get(diagnosis_id) is not feed:
            return
        feed.epoch, feed.last = position.epoch, position.offset
        if not feed.ready.done():
            feed.ready.set_result(None)
        # an arrival from another epoch means history was lost around the subscription: let a fill sort it out
        mismatch = any(p.epoch != feed.epoch for p in feed.pending.values())
        if mismatch or (feed.pending and self._drain(diagnosis_id, feed)):
            self.fill(diagnosis_id, feed)

    def fill(self, diagnosis_id: int, feed: Feed) -> None:
        """Read the stream from what was handed on last; one fill at a time per diagnosis."""
        if not feed.ready.done():
            return
        if feed.filling is not None:
            feed.refill = True
            return
        feed.filling = asyncio.create_task(self._fill(diagnosis_id, feed))

    async def _fill(self, diagnosis_id: int, feed: Feed) -> None:
        try:
            while True:
                feed.refill = False
                try:
                    history = await self._fill_source(diagnosis_id, feed.last)
                except BrokerUnavailable:
                    return  # the link reconnects and asks every feed to catch up then
                if self.feeds.get(diagnosis_id) is not feed:
                    return
                position = history.position
                if position.epoch == feed.epoch and position.offset < feed.last and self._reset_epoch is not None:
                    log.warning("diagnosis %s: the broker's offsets went back (%d after %d handed on): an older copy "
                                "of its data; starting a new history", diagnosis_id, position.offset, feed.last)
                    try:
                        await self._reset_epoch(diagnosis_id, position.epoch)
                    except BrokerUnavailable:
                        return
                    feed.refill = True  # read again: the new epoch then closes the connections for a resume
                    continue
                if position.epoch != feed.epoch:
                    log.warning("diagnosis %s: the broker's history was lost (new epoch); closing its connections "
                                "for a resume", diagnosis_id)
                    self._events("lost", "epoch")
                    feed.epoch, feed.last = position.epoch, position.offset
                    self.on_lost(diagnosis_id, position.epoch)
                    self._release_waiters(feed, math.inf)
                elif history.oldest > feed.last + 1:
                    log.warning("diagnosis %s: offsets %d-%d are no longer retained; closing its connections for a "
                                "resume", diagnosis_id, feed.last + 1, history.oldest - 1)
                    self._events("lost", "gap")
                    feed.last = position.offset
                    self.on_lost(diagnosis_id, None)
                    self._release_waiters(feed, math.inf)
                else:
                    filled = 0
                    for publication in history.publications:
                        if publication.offset <= feed.last:
                            continue
                        # a hole inside what is retained is an entry that did not open (sealed with a retired
                        # key): it was dropped and counted, and is skipped rather than waited for
                        feed.pending.pop(publication.offset, None)
                        self._hand(feed, publication)
                        filled += 1
                    feed.last = max(feed.last, position.offset)
                    if filled:
                        self._events("gap_fill", "")
                gap = self._drain(diagnosis_id, feed)
                if not (gap or feed.refill):
                    return
        finally:
            if feed.filling is asyncio.current_task():
                feed.filling = None

    def own(self, publication: Publication) -> None:
        """This node's own publish, answered by the script: hand it on at once when it is the next one, rather
        than wait for its copy through pub/sub (which then comes as a repeat and is dropped)."""
        feed = self.feeds.get(publication.diagnosis_id)
        if (feed is not None and feed.ready.done() and feed.filling is None and feed.epoch == publication.epoch
                and publication.offset == feed.last + 1):
            self._hand(feed, publication)
            if feed.pending:
                self._drain(publication.diagnosis_id, feed)

    async def wait_delivered(self, diagnosis_id: int, offset: int, epoch: str, link_up: bool = True) -> None:
        """Return once this node handed `offset` on (its own publish): the publications before it come through
        pub/sub in order; if they lag (or the link is down), fill from the stream."""
        feed = self.feeds.get(diagnosis_id)
        if feed is None or not feed.ready.done() or (feed.epoch == epoch and feed.last >= offset):
            return
        if not link_up:
            self.fill(diagnosis_id, feed)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        feed.waiters.setdefault(offset, []).append(waiter)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self._fill_after)
            except TimeoutError:
                self.fill(diagnosis_id, feed)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, self._timeout)
        finally:
            if not waiter.done():
                waiter.cancel()
            waiting = feed.waiters.get(offset)
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del feed.waiters[offset]
