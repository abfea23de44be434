"""Who owns a diagnosis: a TTL cache with one shared query per diagnosis in front of the read replica (PROTOCOL 7).

A reconnect storm after a deploy asks for the same diagnoses many times at once; every concurrent check of one
diagnosis waits on the same query, and answers (owner, or "no such diagnosis") are kept `ttl` seconds.
Failures are never cached: the next check asks again, so the service recovers by itself.

A storm also asks for thousands of *different* diagnoses at once. When the source can answer many in one query
(`BatchOwnershipSource.batching`), misses are gathered for `batch_window` seconds (0: until the end of the current
event-loop iteration) and asked together, up to MAX_BATCH per query. While BATCHES_IN_FLIGHT queries are under way,
new misses wait for one of them to answer and go together in the next: the busier the node (a storm spreads
thousands of reconnects over a few seconds), the larger the batches. Measured (tests/bench storm, 5,000 clients
back within seconds): one query per client without batching, ~2.7 clients per query with a 1 ms window and two
batches in flight, ~10 with 5 ms and one in flight (the default); a quiet node waits only the window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from realtime_service.auth.tokens import Principal
from realtime_service.errors import DiagnosisNotFound, Forbidden, OwnershipUnavailable

MAX_CACHED = 200_000
MAX_BATCH = 1000  # diagnoses per batch query: bounds the statement's size and its time on the replica
BATCHES_IN_FLIGHT = 1  # batch queries at once; misses arriving meanwhile wait for the next one


class OwnershipSource(Protocol):
    """Answers "who owns diagnosis N" from the replica.

    `owner_of` returns the owner's user id or None for no such diagnosis; it raises OwnershipUnavailable when the
    replica does not answer in time. It never hangs longer than its configured timeouts.
    """

    async def owner_of(self, diagnosis_id: int) -> int | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class BatchOwnershipSource(OwnershipSource, Protocol):
    """A source that can also answer for many diagnoses in one query (when `batching` is true).

    `owners_of` answers for every id it was given: the owner's id, or None for no such diagnosis.
    """

    @property
    def batching(self) -> bool: ...

    async def owners_of(self, diagnosis_ids: Sequence[int]) -> dict[int, int | None]: ...


def _retrieve(future: asyncio.Future[int | None]) -> None:
    # Every caller may have gone; the failure is theirs to see, not the event loop's to log.
    if not future.cancelled():
        future.exception()


class OwnershipChecker:
    """Cache and single-flight around an OwnershipSource."""

    def __init__(self, source: OwnershipSource, ttl: float, clock: Callable[[], float] = time.monotonic,
                 on_lookup: Callable[[str], None] | None = None, batch_window: float = 0.005) -> None:
        self._source = source
        self._batch_source = cast(BatchOwnershipSource, source) if getattr(source, "batching", False) else None
        self._batch_window = batch_window
        self._queued: list[tuple[int, asyncio.Future[int | None]]] = []  # misses waiting for the next batch
        self._flush_handle: asyncio.Handle | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[int, tuple[int | None, float]] = {}
        self._inflight: dict[int, asyncio.Future[int | None]] = {}
        self._generation = 0  # bumped by forget(): answers of lookups started before it are not cached
        self._on_lookup = on_lookup or (lambda outcome: None)

    @property
    def generation(self) -> int:
        """Changes whenever a decision is forgotten (a revoke)."""
        return self._generation

    @property
    def source(self) -> OwnershipSource:
        return self._source

    async def owner_of(self, diagnosis_id: int) -> int | None:
        """The owner's id, None if the diagnosis does not exist; raises OwnershipUnavailable."""
        hit = self._cache.get(diagnosis_id)
        if hit is not None and hit[1] > self._clock():
            self._on_lookup("hit")
            return hit[0]
        pending = self._inflight.get(diagnosis_id)
        if pending is not None:
            self._on_lookup("shared")
        else:
            self._on_lookup("miss")
            if self._batch_source is not None:
                pending = self._enqueue(diagnosis_id)
            else:
                # A task of its own: a caller that gives up (its client left) does not cancel the others' answer.
                pending = asyncio.ensure_future(self._lookup(diagnosis_id))
            pending.add_done_callback(_retrieve)
            self._inflight[diagnosis_id] = pending
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The shared lookup ended cancelled while this caller was not: a source let a CancelledError out
            # (aiopg renders the server's statement timeout so). For this caller that is an unavailable replica.
            task = asyncio.current_task()
            if pending.cancelled() and task is not None and not task.cancelling():
                raise OwnershipUnavailable("the ownership check did not complete") from None
            raise

    async def _lookup(self, diagnosis_id: int) -> int | None:
        generation = self._generation
        try:
            owner = await self._source.owner_of(diagnosis_id)
        finally:
            if self._inflight.get(diagnosis_id) is asyncio.current_task():
                del self._inflight[diagnosis_id]
        if self._ttl > 0 and generation == self._generation:
            self._remember(diagnosis_id, owner)
        return owner

    def _enqueue(self, diagnosis_id: int) -> asyncio.Future[int | None]:
        """A future answered by the next batch query; the batch is sent after the window, or at once when full."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int | None] = loop.create_future()
        self._queued.append((diagnosis_id, future))
        if len(self._queued) >= MAX_BATCH and len(self._batches) < BATCHES_IN_FLIGHT:
            self._send_batch()
        elif self._flush_handle is None:
            self._flush_handle = (loop.call_later(self._batch_window, self._send_batch) if self._batch_window > 0
                                  else loop.call_soon(self._send_batch))
        return future

    def _send_batch(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if len(self._batches) >= BATCHES_IN_FLIGHT:
            return  # sent when one of those answers (_batch_done)
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), MAX_BATCH):
            # Its own task, like a single lookup: callers that give up do not cancel the others' answers.
            task = asyncio.ensure_future(self._lookup_many(queued[start:start + MAX_BATCH]))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._queued and self._flush_handle is None:
            self._send_batch()

    async def _lookup_many(self, queued: list[tuple[int, asyncio.Future[int | None]]]) -> None:
        assert self._batch_source is not None
        generation = self._generation
        try:
            owners = await self._batch_source.owners_of(list(dict.fromkeys(d for d, _ in queued)))
        except BaseException as exc:
            for diagnosis_id, future in queued:
                if self._inflight.get(diagnosis_id) is future:
                    del self._inflight[diagnosis_id]
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()  # seen by each caller as unavailable, unless it is itself cancelled
                    else:
                        future.set_exception(exc)
            if isinstance(exc, Exception):
                return  # every caller got it; nobody else is waiting for this task
            raise
        for diagnosis_id, future in queued:
            if self._inflight.get(diagnosis_id) is future:
                del self._inflight[diagnosis_id]
            owner = owners.get(diagnosis_id)
            if self._ttl > 0 and generation == self._generation:
                self._remember(diagnosis_id, owner)
            if not future.done():
                future.set_result(owner)

    def _remember(self, diagnosis_id: int, owner: int | None) -> None:
        if len(self._cache) >= MAX_CACHED:
            now = self._clock()
            for key in [k for k, (_o, exp) in self._cache.items() if exp <= now]:
                del self._cache[key]
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache[diagnosis_id] = (owner, self._clock() + self._ttl)

    def forget(self, diagnosis_id: int) -> None:
        """Drop the cached decision (revoke endpoint); a lookup already under way is not joined or cached (one still
        queued for the next batch is asked after this, so its answer may be)."""
        self._cache.pop(diagnosis_id, None)
        self._inflight.pop(diagnosis_id, None)
        self._generation += 1

    async def require_exists(self, diagnosis_id: int) -> int:
        """The owner; DiagnosisNotFound if there is none."""
        owner = await self.owner_of(diagnosis_id)
        if owner is None:
            raise DiagnosisNotFound(f"diagnosis {diagnosis_id} does not exist")
        return owner

    async def require_watcher(self, principal: Principal, diagnosis_id: int) -> None:
        """The principal may watch the diagnosis: it exists and the user owns it. Services never own one."""
        owner = await self.require_exists(diagnosis_id)
        if principal.is_service or principal.user_id != owner:
            raise Forbidden(f"not allowed to watch diagnosis {diagnosis_id}")

    async def require_publisher(self, principal: Principal, diagnosis_id: int) -> None:
        """A service may publish to any existing diagnosis; a user only to its own."""
        owner = await self.require_exists(diagnosis_id)
        if not principal.is_service and principal.user_id != owner:
            raise Forbidden(f"not allowed to publish to diagnosis {diagnosis_id}")

    async def may_watch(self, user_id: int, diagnosis_id: int) -> bool:
        return await self.owner_of(diagnosis_id) == user_id
