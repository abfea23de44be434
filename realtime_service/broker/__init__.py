"""Brokers: where offsets, history, cursors, personal inboxes and idempotency records live.

`MemoryBroker` (one node, the default) and, later, a Redis broker implement the same `Broker` interface and pass
the same contract tests.
"""

from realtime_service.broker.base import (
    Broker,
    Cursor,
    History,
    Publication,
    PublicationHandler,
    StreamPosition,
)

__all__ = ["Broker", "Cursor", "History", "Publication", "PublicationHandler", "StreamPosition"]
