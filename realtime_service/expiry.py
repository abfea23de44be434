"""Token expiry of every connection of a node on one timer (issue 11).

A loop timer per connection costs ~600 bytes (handle, bound method, arguments) for an event that comes once, an
hour later. Here each connection costs one small list in a heap, and the node keeps one timer, set for the
earliest expiry. An entry is invalidated in place when its connection closes or refreshes its token, so a closed
connection is never kept alive by its entry (only the three-slot list waits for its time), and the heap is
compacted when more than half of it is invalid.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

Entry = list[Any]  # [due (loop time), sequence, callback or None once cancelled]


class ExpiryHeap:
    """Calls each registered callback once at its due time (loop clock), unless cancelled before."""

    __slots__ = ("_dead", "_due", "_handle", "_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._dead = 0

    def __len__(self) -> int:
        return len(self._heap) - self._dead

    def add(self, due: float, callback: Callable[[], None]) -> Entry:
        """Call `callback` at loop time `due`; returns the entry to pass to `cancel`."""
        entry: Entry = [due, next(self._seq), callback]
        heapq.heappush(self._heap, entry)
        if self._handle is None or due < self._due:
            self._arm()
        return entry

    def cancel(self, entry: Entry) -> None:
        if entry[2] is not None:
            entry[2] = None
            self._dead += 1
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._dead = 0

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        while self._heap and self._heap[0][2] is None:
            heapq.heappop(self._heap)
            self._dead -= 1
        if self._heap:
            self._due = self._heap[0][0]
            self._handle = asyncio.get_running_loop().call_at(self._due, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = asyncio.get_running_loop().time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            callback = entry[2]
            if callback is None:
                self._dead -= 1
                continue
            entry[2] = None
            callback()
        self._arm()
