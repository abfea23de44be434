"""`realtime-service serve` as the soak runs it: the same `run_server`, plus a stats socket for the soak to read.

The service exposes no count of its asyncio tasks or open descriptors (nor should it, to strangers), so the soak
starts the server through this module: it serves exactly as `serve` does (same settings from the environment,
same event loop, same EdgeRunner and drain), and answers each connection to a Unix socket with one JSON line of
process figures, taken after a full garbage collection.

    python -m tests.soak.server /path/to/stats.sock      (settings from REALTIME_* variables)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from realtime_service.cli import run_loop, run_server
from realtime_service.logs import configure_logging
from realtime_service.settings import load_settings


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    """Ask glibc to hand freed heap pages back to the system (it keeps them for reuse otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def figures() -> dict[str, Any]:
    """Resident memory, open descriptors and asyncio tasks of this process, right now (and, with
    SOAK_TRACEMALLOC=1, the lines that hold the most memory: where to look when memory did not come back)."""
    gc.collect()
    raw = _rss()
    _trim()
    out: dict[str, Any] = {"rss_bytes": _rss(), "rss_untrimmed_bytes": raw,
                           "open_fds": len(os.listdir("/proc/self/fd")), "asyncio_tasks": len(asyncio.all_tasks()),
                           "gc_objects": len(gc.get_objects())}
    if tracemalloc.is_tracing():
        out["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        kinds = Counter(type(o).__qualname__ for o in gc.get_objects())
        out["object_kinds"] = dict(kinds.most_common(12))
        top = tracemalloc.take_snapshot().statistics("traceback")[:8]
        out["top_allocations"] = [f"{stat.size} B in {stat.count} blocks: " + " <- ".join(
            f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}" for frame in stat.traceback[-6:]) for stat in top]
    return out


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(json.dumps(figures()).encode() + b"\n")
    await writer.drain()
    writer.close()


async def main(stats_path: str) -> int:
    settings = load_settings(os.environ)
    configure_logging(settings.log_level)
    stats = await asyncio.start_unix_server(_answer, path=stats_path)
    try:
        return await run_server(settings)
    finally:
        stats.close()


if __name__ == "__main__":
    if os.environ.get("SOAK_TRACEMALLOC"):
        tracemalloc.start(6)
    sys.exit(run_loop(main(sys.argv[1])))
