"""Load-generator worker processes (subscribers and publishers).

Each worker is a separate OS process with its own asyncio loop, driven by the orchestrator
(`run.py`) over a multiprocessing Pipe with small tuples ``(command, payload)``.

Subscriber worker commands:  connect -> "connected"; (frames flow) -> "done" once every
subscriber has all expected offsets; "resume_slow"; "status" -> "status"; "stop" -> "result";
"exit".  Publisher worker commands: "publish" -> "published"; "exit".
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from multiprocessing.connection import Connection
from typing import Any

import orjson

from .stats import count_offsets, raise_nofile_limit
from .wire import (
    ClosedBeforeConnect,
    HandshakeError,
    Sink,
    WSSubscriber,
    build_post,
    open_http,
    open_subscriber,
)

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process if its parent dies (Linux only; best effort)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _hard_deadline(seconds: float) -> None:
    t = threading.Timer(seconds, lambda: os._exit(3))
    t.daemon = True
    t.start()


def run_loop(main: Coroutine[Any, Any, None], use_uvloop: bool) -> str:
    """Run `main` on uvloop when asked and installed (much cheaper per read), else asyncio."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return "uvloop"
    asyncio.run(main)
    return "asyncio"


def loop_name(use_uvloop: bool) -> str:
    if use_uvloop:
        try:
            import uvloop

            return f"uvloop {uvloop.__version__}"
        except ImportError:
            pass
    return "asyncio"


def _worker_boot(deadline_s: float) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator handles Ctrl-C and kills us
    raise_nofile_limit()
    _hard_deadline(deadline_s)


class _Commands:
    """Receive pipe messages inside the event loop.

    A reader thread does the blocking recv(): watching the fd with add_reader would let uvloop
    make the (duplex) pipe non-blocking, and large sends from this side would then fail.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def reader() -> None:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = ("exit", None)
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, msg)
                except RuntimeError:  # loop closed
                    return
                if msg[0] == "exit":
                    return

        threading.Thread(target=reader, name="commands", daemon=True).start()

    async def get(self) -> tuple[str, Any]:
        return await self.queue.get()


# --------------------------------------------------------------------------- subscribers


def subscriber_main(conn: Connection, cfg: dict[str, Any]) -> None:
    _worker_boot(cfg["deadline_s"])
    try:
        run_loop(_subscriber(conn, cfg), cfg.get("uvloop", True))
    finally:
        conn.close()


async def _subscriber(conn: Connection, cfg: dict[str, Any]) -> None:
    cmds = _Commands(conn)
    host, port = cfg["host"], cfg["port"]
    subs_spec: list[tuple[int, str, str | None]] = cfg["subs"]  # (diagnosis_id, token, device)
    expected: dict[int, int] = cfg.get("expected", {})
    slow_idx: int | None = cfg.get("slow_index")
    concurrency = cfg.get("concurrency", 200)
    sink = Sink()
    slow_sink = Sink()
    subs: list[WSSubscriber | None] = [None] * len(subs_spec)
    lat_connect: list[float] = []
    failures: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)
    remaining = [0]
    done_sent = [False]

    def on_complete(_sub: Any) -> None:
        remaining[0] -= 1
        if remaining[0] == 0 and not done_sent[0]:
            done_sent[0] = True
            conn.send(("done", {"t_last": sink.t_last}))

    sink.on_complete = on_complete

    async def one(i: int) -> None:
        diag, token, device = subs_spec[i]
        slow = i == slow_idx
        async with sem:
            t0 = time.monotonic()
            try:
                p = await open_subscriber(
                    host,
                    port,
                    diag,
                    token,
                    slow_sink if slow else sink,
                    expected=0 if slow else expected.get(diag, 0),
                    slow=slow,
                    rcvbuf=cfg.get("slow_rcvbuf") if slow else None,
                    device=device,
                    timeout=cfg.get("connect_timeout", 15.0),
                )
            except HandshakeError as e:
                failures[f"http_{e.status}"] += 1
                return
            except ClosedBeforeConnect as e:
                failures[f"closed_{e.code}_{e.reason}"] += 1
                return
            except TimeoutError:
                failures["timeout"] += 1
                return
            except OSError as e:
                failures[f"oserror_{e.errno}"] += 1
                return
            lat_connect.append(time.monotonic() - t0)
            subs[i] = p

    conn.send(("ready", {"pid": os.getpid()}))
    while True:
        cmd, _arg = await cmds.get()
        if cmd == "go":
            break
        if cmd == "exit":
            return
    t_start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(len(subs_spec))))
    t_conn_end = time.monotonic()
    ok = [s for s in subs if s is not None]
    normal = [s for i, s in enumerate(subs) if s is not None and i != slow_idx]
    remaining[0] = sum(1 for s in normal if not s.complete)
    from array import array

    conn.send(
        (
            "connected",
            {
                "ok": len(ok),
                "failed": len(subs_spec) - len(ok),
                "failures": dict(failures),
                "lat": array("d", lat_connect).tobytes(),
                "t_start": t_start,
                "t_end": t_conn_end,
                "connect_offsets": dict(
                    Counter(int((s.connect_frame or {}).get("data", {}).get("offset", -1)) for s in ok)
                ),
                "pid": os.getpid(),
            },
        )
    )
    if remaining[0] == 0 and expected and not done_sent[0]:
        done_sent[0] = True
        conn.send(("done", {"t_last": sink.t_last}))

    while True:
        cmd, arg = await cmds.get()
        if cmd == "status":
            closes = Counter(f"{s.ended}:{s.close_code}:{s.close_reason}" for s in ok if s.ended is not None)
            conn.send(
                (
                    "status",
                    {"alive": sum(1 for s in ok if s.alive), "ended": dict(closes)},
                )
            )
        elif cmd == "resume_slow":
            if slow_idx is not None and subs[slow_idx] is not None:
                sp = subs[slow_idx]
                assert sp is not None
                if sp.transport is not None and not sp.transport.is_closing():
                    sp.transport.resume_reading()
        elif cmd == "stop":
            await _finish_slow(
                subs[slow_idx] if slow_idx is not None else None,
                arg.get("slow_wait", 0.0),
            )
            conn.send(
                (
                    "result",
                    _subscriber_result(ok, normal, subs, slow_idx, sink, slow_sink, arg),
                )
            )
        elif cmd == "exit":
            for s in ok:
                s.close()
            await asyncio.sleep(0.05)
            for s in ok:
                s.abort()
            return


async def _finish_slow(sp: WSSubscriber | None, wait: float) -> None:
    if sp is None:
        return
    if sp.transport is not None and not sp.transport.is_closing():
        sp.transport.resume_reading()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(sp.finished), wait)


def _subscriber_result(
    ok: list[WSSubscriber],
    normal: list[WSSubscriber],
    subs: list[WSSubscriber | None],
    slow_idx: int | None,
    sink: Sink,
    slow_sink: Sink,
    arg: dict[str, Any],
) -> dict[str, Any]:
    offsets: dict[int, list[int]] = arg.get("offsets", {})
    lost = dup = unexpected = 0
    incomplete = 0
    expected_total = 0
    for s in normal:
        exp = offsets.get(s.diagnosis_id, [])
        expected_total += len(exp)
        lo, du, un = count_offsets(s.counts, exp)
        lost += lo
        dup += du
        unexpected += un
        if not s.complete:
            incomplete += 1
    ended = Counter(f"{s.ended}:{s.close_code}:{s.close_reason}" for s in normal if s.ended is not None)
    slow: dict[str, Any] | None = None
    if slow_idx is not None:
        sp = subs[slow_idx]
        if sp is not None:
            slow = {
                "ended": sp.ended,
                "close_code": sp.close_code,
                "close_reason": sp.close_reason,
                "frames_read": slow_sink.frames,
                "t_end": sp.t_end,
            }
        else:
            slow = {"ended": "never_connected"}
    return {
        "subscribers": len(normal),
        "deliveries": sum(s.distinct for s in normal),
        "expected_deliveries": expected_total,
        "frames": sink.frames,
        "other_frames": sink.other_frames,
        "bytes": sink.bytes,
        "lost": lost,
        "duplicated": dup,
        "unexpected": unexpected,
        "incomplete_subscribers": incomplete,
        "order_breaks": sum(s.order_breaks for s in normal),
        "subscribers_with_order_breaks": sum(1 for s in normal if s.order_breaks),
        "ended_during_run": dict(ended),
        "alive": sum(1 for s in normal if s.alive),
        "lat": sink.lat.tobytes(),
        "t_first": sink.t_first,
        "t_last": sink.t_last,
        "slow": slow,
        "all_connected": len(ok),
    }


# --------------------------------------------------------------------------- publisher


def publisher_main(conn: Connection, cfg: dict[str, Any]) -> None:
    _worker_boot(cfg["deadline_s"])
    try:
        run_loop(_publisher(conn, cfg), cfg.get("uvloop", True))
    finally:
        conn.close()


async def _publisher(conn: Connection, cfg: dict[str, Any]) -> None:
    cmds = _Commands(conn)
    host, port, token = cfg["host"], cfg["port"], cfg["token"]
    nconns = cfg.get("connections", 8)
    pool = [await open_http(host, port) for _ in range(nconns)]
    conn.send(("ready", {"pid": os.getpid()}))
    while True:
        cmd, arg = await cmds.get()
        if cmd == "publish":
            conn.send(("published", await _publish(host, port, token, pool, arg)))
        elif cmd == "exit":
            for p in pool:
                if p.transport is not None:
                    p.transport.close()
            return


async def _publish(host: str, port: int, token: str, pool: list[Any], arg: dict[str, Any]) -> dict[str, Any]:
    plan: list[int] = arg["plan"]
    rate: float | None = arg.get("rate")
    pad = "x" * int(arg.get("pad", 0))
    mtype = arg.get("type", "bench")
    path = arg.get("path", "/api/v1/publish")
    idle: asyncio.Queue[Any] = asyncio.Queue()
    for p in pool:
        idle.put_nowait(p)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    offsets: dict[int, list[int]] = {}
    delivered = 0
    req_lat: list[float] = []
    sent_at: list[float] = [0.0] * len(plan)
    first_error: list[str] = []
    t_last_resp = [0.0]

    async def send(p: Any, i: int) -> None:
        nonlocal delivered
        diag = plan[i]
        data: dict[str, Any] = {"t": 0.0, "i": i}
        if pad:
            data["pad"] = pad
        t = time.monotonic()
        data["t"] = t
        body = orjson.dumps({"diagnosis_id": diag, "type": mtype, "data": data})
        sent_at[i] = t
        try:
            status, rbody = await p.request(build_post(host, port, path, token, body))
        except Exception as e:
            errors[type(e).__name__] += 1
            if not first_error:
                first_error.append(repr(e))
            try:
                p = await open_http(host, port)
            except OSError:
                pass
            idle.put_nowait(p)
            return
        now = time.monotonic()
        t_last_resp[0] = now
        req_lat.append(now - t)
        statuses[status] += 1
        if status == 200:
            try:
                r = orjson.loads(rbody)
                off = r.get("offset")
                if off is not None:
                    offsets.setdefault(diag, []).append(int(off))
                d = r.get("delivered")
                if isinstance(d, int):
                    delivered += d
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                errors["bad_response"] += 1
        elif not first_error:
            first_error.append(f"HTTP {status}: {rbody[:300].decode('utf-8', 'replace')}")
        idle.put_nowait(p)

    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    for i in range(len(plan)):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        p = await idle.get()
        task = asyncio.create_task(send(p, i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    t_end = time.monotonic()
    req_lat.sort()
    from .stats import summarize_latencies

    return {
        "n": len(plan),
        "ok": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": dict(errors),
        "first_error": first_error[0] if first_error else None,
        "offsets": offsets,
        "delivered_reported": delivered,
        "t_first_send": sent_at[0] if plan else t0,
        "t_last_resp": t_last_resp[0] or t_end,
        "elapsed": t_end - t0,
        "request_latency": summarize_latencies(req_lat),
    }
