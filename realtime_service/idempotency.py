"""Idempotent publishing (PROTOCOL 4, 5.2): one publish per Idempotency-Key and caller, over every node.

The key is reserved in the broker first, atomically, so of two nodes receiving the same key at the same moment
exactly one publishes and the other waits for its answer; a repeat with another body is a caller's bug and is
refused. On this node, callers of one key share one task, which a caller that disconnects cannot cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

from realtime_service.broker.base import Broker
from realtime_service.errors import BrokerUnavailable, IdempotencyKeyReused, ServiceError

log = logging.getLogger("realtime.node")

LEASE = 15.0  # seconds a reservation survives a node that died while publishing
POLL = 0.02  # seconds between looks at a key another node is publishing


def _retrieve(future: asyncio.Future[bytes]) -> None:
    # Every caller may have gone; the failure was theirs to see, not the event loop's to log.
    if not future.cancelled():
        future.exception()


def _reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused("this Idempotency-Key was used with another body; use a new key for a new message",
                                {"Idempotency-Key": "reused with a different body"})


class Idempotency:
    """Runs each keyed publish once; repeats get the first answer."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._inflight: dict[tuple[str, str], tuple[str, asyncio.Future[bytes]]] = {}

    async def run(self, scope: str, key: str | None, fingerprint: str,
                  produce: Callable[[], Awaitable[bytes]]) -> bytes:
        """The work runs in a task of its own: a caller that disconnects half-way neither leaves a batch half
        published nor fails a retry that is waiting on the same key."""
        if key is None:
            return await asyncio.shield(asyncio.ensure_future(produce()))
        running = self._inflight.get((scope, key))
        if running is not None:
            if running[0] != fingerprint:
                raise _reused()
            return await asyncio.shield(running[1])
        pending = asyncio.ensure_future(self._produce_once(scope, key, fingerprint, produce))
        pending.add_done_callback(_retrieve)
        self._inflight[(scope, key)] = (fingerprint, pending)
        return await asyncio.shield(pending)

    async def _produce_once(self, scope: str, key: str, fingerprint: str,
                            produce: Callable[[], Awaitable[bytes]]) -> bytes:
        token = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        give_up = loop.time() + LEASE
        try:
            while True:
                held = await self._broker.reserve_idempotency(scope, key, fingerprint, token, LEASE)
                if held is None:
                    break
                if held.fingerprint != fingerprint:
                    raise _reused()
                if held.done:
                    return held.result
                if loop.time() > give_up:  # another node holds it and neither finishes nor lets go
                    raise BrokerUnavailable("a publish with this Idempotency-Key is still running; retry later")
                await asyncio.sleep(POLL)
            try:
                result = await produce()
            except BaseException:
                with contextlib.suppress(ServiceError):
                    await self._broker.release_idempotency(scope, key, token)
                raise
            try:
                await self._broker.complete_idempotency(scope, key, token, result)
            except BrokerUnavailable:
                log.warning("a published answer could not be stored under its Idempotency-Key")
            return result
        finally:
            self._inflight.pop((scope, key), None)
