"""Garbage-collector thresholds for a process that holds many long-lived connections (issue 11).

A connection is a few hundred container objects (aiohttp's protocol, request and response, tasks, futures, the
connection and its outbox) that live as long as it does. CPython's default thresholds (700, 10, 10) run a
young collection every 700 allocations and a full one every ~70,000, and a full collection walks every live
object: during a reconnect storm of thousands of clients the collector took 18 % of the server's CPU in a py-spy
profile of the connect scenario (tests/bench/README.md). With a larger first threshold, the young collections
are rarer and a full one runs about every 10 million allocations (and, as always in CPython 3.11+, only once the
objects that survived since the last one are a quarter of all long-lived ones). Garbage without cycles is still
freed at once by reference counting; cyclic garbage waits a little longer, bounded by the same thresholds.

Objects created during start-up (modules, settings, the app) are frozen: no collection ever scans them again.

The price: whatever only the cycle collector can free waits longer. A connection whose objects form a reference
cycle leaves all of them (with aiohttp's request and writers and the loop's transport behind them) to it; under
churn, with these thresholds, that garbage reached tens of MiB, and the allocators kept the pages after it was
freed (pymalloc's 1 MiB arenas: 42 -> 91 in one minute of 13,500 connections; issue 9). So a closed connection
must hold no cycle (Connection drops its transport when closed, the WebSocket its parser and `Live` once
finished); the soak counts the collector's garbage per connection served and fails above a bound
(tests/soak/soak.py, GARBAGE_PER_CONNECTION).
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 10)


def tune_for_connections() -> None:
    """Call once, after the app is built and before it accepts connections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
