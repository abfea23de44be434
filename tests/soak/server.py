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
from tests.soak.cycles import describe


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


_COLLECTED = [0, 0, 0]  # cyclic garbage the collector found, by generation, since start
_COLLECTIONS = [0, 0, 0]


def _count_garbage(phase: str, info: dict[str, int]) -> None:
    if phase == "stop":
        _COLLECTED[info["generation"]] += info["collected"]
        _COLLECTIONS[info["generation"]] += 1


def _libc() -> ctypes.CDLL | None:
    global _LIBC  # loaded once: a CDLL made per reading is itself cyclic garbage, which the soak counts
    if _LIBC is None:
        with contextlib.suppress(OSError):
            _LIBC = ctypes.CDLL("libc.so.6")
    return _LIBC


_LIBC: ctypes.CDLL | None = None


def _trim() -> None:
    """Ask glibc to hand freed heap pages back to the system (it keeps them for reuse otherwise)."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo() -> dict[str, int]:
    """glibc's own account over all its arenas: bytes in use (`uordblks` + `hblkhd`, mmapped chunks) and free
    but kept (`fordblks`). Memory the process holds beyond these is not glibc's malloc."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None)
    if fn is None:
        return {}
    fn.restype = _MallInfo2
    info = fn()
    return {"malloc_arena": info.arena, "malloc_in_use": info.uordblks, "malloc_free": info.fordblks,
            "malloc_mmapped": info.hblkhd}


def mappings() -> dict[str, int]:
    """Resident bytes by kind of mapping (/proc/self/smaps): `[heap]` (glibc's main arena), anonymous regions
    (other arenas, pymalloc's arenas, mmapped chunks, other allocators' segments), the stacks, and files."""
    out: Counter[str] = Counter()
    kind = "other"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:
                name = head[5].strip() if len(head) > 5 else ""
                kind = ("heap" if name == "[heap]" else "stack" if name.startswith("[stack") else
                        "anon" if not name else "file" if name.startswith("/") else "other")
            elif line.startswith("Rss:"):
                out[kind] += int(line.split()[1]) * 1024
    return dict(out)


def _dump(folder: Path) -> None:
    """SOAK_SMAPS_DIR: /proc/self/smaps, pymalloc's statistics (`sys._debugmallocstats`, which writes to the C
    stderr) and, with SOAK_TRACEMALLOC=1, a tracemalloc snapshot, numbered per reading, to diff by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("smaps.*")))
    (folder / f"smaps.{n}").write_text(Path("/proc/self/smaps").read_text())
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(folder / f"trace.{n}"))
    sys.stderr.flush()
    saved = os.dup(2)
    with open(folder / f"pymalloc.{n}", "wb") as out:
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def figures() -> dict[str, Any]:
    """Resident memory (now, its peak, by kind of mapping, and glibc's account of it), open descriptors, asyncio
    tasks and the cyclic garbage found so far, of this process, right now. With SOAK_TRACEMALLOC=1 also the lines
    that hold the most memory; with SOAK_GC_DEBUG=1 what the cyclic garbage is made of and its cycles."""
    gc.collect()
    raw = _rss()
    _trim()
    out: dict[str, Any] = {"rss_bytes": _rss(), "rss_untrimmed_bytes": raw,
                           "rss_peak_bytes": _rss("VmHWM"), "gc_collected": list(_COLLECTED),
                           "gc_collections": list(_COLLECTIONS),
                           "open_fds": len(os.listdir("/proc/self/fd")), "asyncio_tasks": len(asyncio.all_tasks()),
                           "gc_objects": len(gc.get_objects()), "mappings": mappings(), **_mallinfo()}
    if gc.get_debug() & gc.DEBUG_SAVEALL:  # SOAK_GC_DEBUG=1: what the cyclic garbage is made of (then freed)
        out["garbage_objects"] = len(gc.garbage)
        out["garbage_kinds"] = dict(Counter(f"{type(o).__module__}.{type(o).__qualname__}"
                                            for o in gc.garbage).most_common(40))
        out["garbage_cycles"] = describe(gc.garbage)
        gc.garbage.clear()
    if os.environ.get("SOAK_SMAPS_DIR"):  # the raw maps and pymalloc's stats, for a diff by hand
        _dump(Path(os.environ["SOAK_SMAPS_DIR"]))
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
    gc.callbacks.append(_count_garbage)
    if os.environ.get("SOAK_GC_DEBUG"):
        gc.set_debug(gc.DEBUG_SAVEALL)
    if os.environ.get("SOAK_GC_THRESHOLDS"):  # an experiment: the collector's thresholds instead of gctune's
        from realtime_service import gctune

        gctune.THRESHOLDS = tuple(int(n) for n in os.environ["SOAK_GC_THRESHOLDS"].split(","))  # type: ignore[assignment]
    if os.environ.get("SOAK_TRACEMALLOC"):
        tracemalloc.start(6)
    sys.exit(run_loop(main(sys.argv[1])))
