"""The node's one-timer token expiry (realtime_service/expiry.py): every due callback runs once, in order, at its
time; a cancelled one never runs, and a closed connection's entry keeps nothing alive."""

from __future__ import annotations

import asyncio
import functools

from realtime_service.expiry import ExpiryHeap


async def test_callbacks_run_once_in_due_order_and_cancelled_ones_never() -> None:
    loop = asyncio.get_running_loop()
    heap = ExpiryHeap()
    fired: list[int] = []
    done = asyncio.Event()
    start = loop.time()
    entries: dict[int, list[object]] = {}
    for i, delay in enumerate([0.30, 0.10, 0.20, 0.05, 0.25]):
        entries[i] = heap.add(start + delay, functools.partial(fired.append, i))
    heap.add(start + 0.35, done.set)
    heap.cancel(entries[2])
    heap.cancel(entries[2])  # twice is fine
    await asyncio.wait_for(done.wait(), 2)
    assert fired == [3, 1, 4, 0]
    assert len(heap) == 0


async def test_an_earlier_entry_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    heap = ExpiryHeap()
    early = asyncio.Event()
    heap.add(loop.time() + 60, lambda: None)
    heap.add(loop.time() + 0.05, early.set)
    await asyncio.wait_for(early.wait(), 1)  # not held back by the later one
    assert len(heap) == 1


async def test_many_cancelled_entries_are_compacted_and_the_live_ones_still_fire() -> None:
    loop = asyncio.get_running_loop()
    heap = ExpiryHeap()
    fired: list[int] = []
    done = asyncio.Event()
    now = loop.time()
    gone = [heap.add(now + 60 + i, lambda: fired.append(-1)) for i in range(1000)]
    keep = [heap.add(now + 0.05 + i / 1000, functools.partial(fired.append, i)) for i in range(10)]
    heap.add(now + 0.2, done.set)
    for entry in gone:
        heap.cancel(entry)
    assert len(heap._heap) < 100  # compacted: the cancelled entries do not pile up
    await asyncio.wait_for(done.wait(), 2)
    assert fired == list(range(10))
    assert all(entry[2] is None for entry in keep)
