"""Who owns a diagnosis: a TTL cache with one shared query per diagnosis in front of the read replica (PROTOCOL 7).

A reconnect storm after a deploy asks for the same diagnoses many times at once; every concurrent check of one
diagnosis waits on the same query, and answers (owner, or "no such diagnosis") are kept `ttl` seconds.
Failures are never cached: the next check asks again, so the service recovers by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from realtime_service.auth.tokens import Principal
from realtime_service.errors import DiagnosisNotFound, Forbidden, OwnershipUnavailable

MAX_CACHED = 200_000


class OwnershipSource(Protocol):
    """Answers "who owns diagnosis N" from the replica.

    `owner_of` returns the owner's user id or None for no such diagnosis; it raises OwnershipUnavailable when the
    replica does not answer in time. It never hangs longer than its configured timeouts.
    """

    async def owner_of(self, diagnosis_id: int) -> int | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _retrieve(future: asyncio.Future[int | None]) -> None:
    # Every caller may have gone; the failure is theirs to see, not the event loop's to log.
    if not future.cancelled():
        future.exception()


class OwnershipChecker:
    """Cache and single-flight around an OwnershipSource."""

    def __init__(self, source: OwnershipSource, ttl: float, clock: Callable[[], float] = time.monotonic,
                 on_lookup: Callable[[str], None] | None = None) -> None:
        self._source = source
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

    def _remember(self, diagnosis_id: int, owner: int | None) -> None:
        if len(self._cache) >= MAX_CACHED:
            now = self._clock()
            for key in [k for k, (_o, exp) in self._cache.items() if exp <= now]:
                del self._cache[key]
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache[diagnosis_id] = (owner, self._clock() + self._ttl)

    def forget(self, diagnosis_id: int) -> None:
        """Drop the cached decision (revoke endpoint); a lookup already under way is not joined or cached."""
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
