"""Where the cyclic garbage comes from: the shortest reference cycle through an object the collector found.

An object that is only freed by the cycle collector waits for it; with the service's collector thresholds
(realtime_service/gctune.py) that is long enough, under churn, for the garbage to reach tens of MiB, and the
allocators keep the pages. The soak server keeps what the collector finds (`gc.DEBUG_SAVEALL`, SOAK_GC_DEBUG=1)
and names its cycles with this, so the cause of such garbage is a line to read, not a guess:

    CYCLE (2): realtime_service.connection.Connection.transport -> realtime_service.web.transport.WebSocketTransport
               .conn -> realtime_service.connection.Connection

An object that is in no cycle itself is garbage only because a cycle reaches it; it is counted, not traced.
"""

from __future__ import annotations

import gc
import itertools
import types
from collections import deque
from collections.abc import Iterable
from typing import Any


def _name(obj: Any) -> str:
    if isinstance(obj, types.FrameType):
        code = obj.f_code
        return f"frame({code.co_name} at {code.co_filename.rsplit('/', 1)[-1]}:{obj.f_lineno})"
    if isinstance(obj, (types.FunctionType, types.MethodType)):
        return f"{type(obj).__name__}({obj.__qualname__})"
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _edge(src: Any, dst: Any) -> str:
    """How `src` refers to `dst`: an attribute, a key, an index, a frame's local, or just `->`."""
    attrs = getattr(src, "__dict__", None)
    if isinstance(attrs, dict):
        for key, value in attrs.items():
            if value is dst:
                return f".{key}"
    for klass in type(src).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if isinstance(slot, str) and getattr(src, slot, None) is dst:
                return f".{slot}"
    if isinstance(src, dict):
        for key, value in src.items():
            if value is dst:
                return f"[{key!r}]"[:60]
    if isinstance(src, (list, tuple, deque)):
        for index, value in enumerate(src):
            if value is dst:
                return f"[{index}]"
    if isinstance(src, types.FrameType):
        for key, value in src.f_locals.items():
            if value is dst:
                return f" local {key}"
    for attr in ("__self__", "__func__", "tb_frame", "tb_next", "__traceback__", "__context__", "__cause__",
                 "cell_contents"):
        try:
            if getattr(src, attr) is dst:
                return f".{attr}"
        except Exception:  # an attribute that cannot be read is not the edge
            continue
    return " ->"


def shortest_cycle(root: Any, among: dict[int, Any]) -> list[Any] | None:
    """Objects from `root` back to `root` (breadth first, only through `among`), or None when root is in none."""
    came_from: dict[int, Any] = {id(root): None}
    queue = deque([root])
    while queue:
        current = queue.popleft()
        for ref in gc.get_referents(current):
            if ref is root:
                path = [current]
                while came_from[id(path[-1])] is not None:
                    path.append(came_from[id(path[-1])])
                return [*reversed(path), root]
            if id(ref) in among and id(ref) not in came_from:
                came_from[id(ref)] = current
                queue.append(ref)
    return None


def describe(garbage: Iterable[Any], per_kind: int = 2, kinds: int = 30) -> list[str]:
    """The distinct shortest cycles through a few objects of each of the most common kinds in `garbage`."""
    objects = list(garbage)
    among = {id(obj): obj for obj in objects}
    counts: dict[type, int] = {}
    for obj in objects:
        counts[type(obj)] = counts.get(type(obj), 0) + 1
    common = sorted(counts, key=lambda kind: -counts[kind])[:kinds]
    seen: dict[str, None] = {}
    for kind in common:
        if kind in (tuple, list, dict, set):
            continue  # containers are in the cycles of the objects that hold them
        for root in [obj for obj in objects if type(obj) is kind][:per_kind]:
            cycle = shortest_cycle(root, among)
            if cycle is None:
                continue
            text = _name(cycle[0]) + "".join(f"{_edge(a, b)} -> {_name(b)}" for a, b in itertools.pairwise(cycle))
            seen.setdefault(f"CYCLE ({len(cycle) - 1}) x{counts[kind]} {_name(root)}: {text}")
    return list(seen)
