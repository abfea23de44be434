"""`realtime-service serve` as the soak runs it: the same `run_server`, plus a stats socket for the soak to read.

The service exposes no count of its asyncio tasks or open descriptors (nor should it, to strangers), so the soak
starts the server through this module: it serves exactly as `serve` does (same settings from the environment,
same event loop, same EdgeRunner and drain), and answers each connection to a Unix socket with one JSON line of
process figures, taken after a full garbage collection.

    python -m tests.soak.server /path/to/stats.sock      (settings from REALTIME_* variables)
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from pathlib import Path

from realtime_service.cli import run_loop, run_server
from realtime_service.logs import configure_logging
from realtime_service.settings import load_settings


def figures() -> dict[str, int]:
    """Resident memory, open descriptors and asyncio tasks of this process, right now."""
    gc.collect()
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"rss_bytes": rss, "open_fds": len(os.listdir("/proc/self/fd")),
            "asyncio_tasks": len(asyncio.all_tasks()), "gc_objects": len(gc.get_objects())}


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
    sys.exit(run_loop(main(sys.argv[1])))
