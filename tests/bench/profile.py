"""Where a connection's CPU and memory go: py-spy over the connect scenario, tracemalloc over idle connections.

    .venv/bin/python -m tests.bench.profile cpu    [--connections 2000] [--concurrency 200]
    .venv/bin/python -m tests.bench.profile memory [--connections 2000]

`cpu` runs the connect scenario (distinct diagnoses, cold ownership cache) against `realtime-service serve` while
`py-spy record --pid` samples the server (needs ptrace: root or CAP_SYS_PTRACE; `pip install py-spy`), then
prints the share of samples per owner (the innermost frame in aiohttp, this service, asyncio/uvloop, PyJWT,
aiopg/psycopg2, pydantic...) and the top functions by self and inclusive time. `memory` runs the server under
tracemalloc (`traced.py`), snapshots it before and after opening N idle connections and prints the growth per
connection grouped by owner, plus the top allocation sites. Neither is a scenario: there is no target; the
figures go into README.md's before/after breakdown. Only loopback; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import os
import pickle  # noqa: F401 - tracemalloc snapshots are pickles
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from .run import ROOT, Bench, BenchError, Deadline, Fleet, log, parse_args
from .stats import proc_cpu_seconds, proc_rss_kb, raise_nofile_limit

OWNERS = (  # (path fragment, owner); the first that matches the innermost interesting frame wins
    ("/realtime_service/", "realtime_service"),
    ("/aiohttp/", "aiohttp"),
    ("/multidict/", "aiohttp (multidict/yarl)"),
    ("/yarl/", "aiohttp (multidict/yarl)"),
    ("/jwt/", "PyJWT"),
    ("/aiopg/", "aiopg/psycopg2"),
    ("/psycopg2/", "aiopg/psycopg2"),
    ("/pydantic", "pydantic"),
    ("/redis/", "redis-py"),
    ("/prometheus_client/", "prometheus_client"),
    ("/uvloop/", "asyncio/uvloop"),
    ("/asyncio/", "asyncio/uvloop"),
    ("/logging/", "logging"),
)
SKIP_OUTER = ("/asyncio/", "/uvloop/", "/logging/", "/contextlib.py", "/functools.py", "/typing.py", "/enum.py",
              "/uuid.py", "/json/", "/re/", "/email/")


def owner_of(filename: str) -> str:
    for fragment, owner in OWNERS:
        if fragment in filename:
            return owner
    if "site-packages" in filename:
        return filename.split("site-packages/")[1].split("/")[0]
    return "python stdlib"


def charge(frames: list[str]) -> str:
    """The owner an allocation (or a sample) is charged to: the innermost frame of a library or of this service;
    stdlib frames (asyncio, uuid, json...) are charged to whoever called them, unless nobody but stdlib did."""
    for filename in frames:  # innermost first
        ours = "site-packages" in filename or "realtime_service" in filename
        if ours and not any(s in filename for s in SKIP_OUTER):
            return owner_of(filename)
    return owner_of(frames[0]) if frames else "?"


# -- memory --------------------------------------------------------------------------------------------------


def _snapshot(pid: int, folder: Path, n: int, deadline: Deadline) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    done = folder / f"snap-{n}.done"
    while not done.exists():
        deadline.check(f"waiting for tracemalloc snapshot {n}")
        time.sleep(0.1)
    return tracemalloc.Snapshot.load(str(folder / f"snap-{n}.pickle"))


def memory(b: Bench, n: int, concurrency: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="rtbench-trace-"))
    b.server_cmd = [sys.executable, "-m", "tests.bench.traced"]
    deadline = Deadline(300.0 + n / 20)
    with b.server("profile-memory", {"BENCH_TRACE_DIR": str(folder)}) as srv, Fleet(b) as fleet:
        b.warm_up(fleet, srv, deadline)
        time.sleep(1.0)
        before = _snapshot(srv.pid, folder, 0, deadline)
        rss0 = proc_rss_kb(srv.pid)
        subs = b.start_subscribers(fleet, srv, b.sub_specs(list(range(1, n + 1))), concurrency=concurrency,
                                   deadline_s=deadline.left())
        for w in subs:
            w.expect("ready", deadline)
            w.send("go")
        ok = sum(w.expect("connected", deadline)["ok"] for w in subs)
        time.sleep(2.0)
        rss1 = proc_rss_kb(srv.pid)
        after = _snapshot(srv.pid, folder, 1, deadline)
    if not ok:
        raise BenchError("no connection opened")
    stats = after.compare_to(before, "traceback")
    by_owner: Counter[str] = Counter()
    by_site: Counter[str] = Counter()
    for stat in stats:
        frames = [f.filename for f in reversed(stat.traceback)]  # innermost first
        by_owner[charge(frames)] += stat.size_diff
        site = next((f for f in reversed(stat.traceback)
                     if "site-packages" in f.filename or "realtime_service" in f.filename), stat.traceback[-1])
        name = site.filename.split("site-packages/")[-1].split("/realtime_service/")[-1]
        by_site[f"{name}:{site.lineno}"] += stat.size_diff
    total = sum(by_owner.values())
    return {
        "connections": ok,
        "rss_kb_per_connection": round((rss1 - rss0) / ok, 2) if rss0 and rss1 else None,
        "traced_bytes_per_connection": round(total / ok),
        "by_owner_bytes_per_connection": {k: round(v / ok) for k, v in by_owner.most_common() if abs(v) / ok >= 8},
        "top_sites_bytes_per_connection": {k: round(v / ok) for k, v in by_site.most_common(25)},
        "note": "RSS under tracemalloc is inflated by its own bookkeeping; use the idle scenario for RSS",
    }


# -- cpu -----------------------------------------------------------------------------------------------------


def _parse_raw(path: Path) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """py-spy --format raw: 'frame;frame;... count' lines, outermost first; frames are 'func (file:line)'."""
    total = 0
    owners: Counter[str] = Counter()
    selfs: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        files = []
        for frame in frames:
            start = frame.rfind("(")
            files.append(frame[start + 1:].rsplit(":", 1)[0] if start >= 0 else frame)
        owners[charge(list(reversed(files)))] += count
        if frames:
            selfs[_short(frames[-1])] += count
        for frame in set(frames):
            inclusive[_short(frame)] += count
    return total, owners, selfs, inclusive


def _short(frame: str) -> str:
    start = frame.rfind("(")
    if start < 0:
        return frame
    func = frame[:start].strip()
    where = frame[start + 1:].rstrip(")").split("site-packages/")[-1].split("/realtime_service/")[-1]
    where = where.split("/lib/python3")[-1]
    return f"{func} ({where.rsplit(':', 1)[0]})"


def cpu(b: Bench, n: int, concurrency: int, rate: int) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="rtbench-spy-")) / "connect.txt"
    spy = Path(sys.executable).parent / "py-spy"
    deadline = Deadline(300.0 + n / 20)
    with b.server("profile-cpu") as srv, Fleet(b) as fleet:
        b.warm_up(fleet, srv, deadline)
        subs = b.start_subscribers(fleet, srv, b.sub_specs(list(range(1, n + 1))), concurrency=concurrency,
                                   deadline_s=deadline.left())
        for w in subs:
            w.expect("ready", deadline)
        proc = subprocess.Popen([str(spy), "record", "--pid", str(srv.pid), "--format", "raw", "--rate", str(rate),
                                 "--output", str(out), "--full-filenames",
                                 *(["--native"] if os.environ.get("BENCH_SPY_NATIVE") else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        cpu0 = proc_cpu_seconds(srv.pid)
        t0 = time.monotonic()
        for w in subs:
            w.send("go")
        infos = [w.expect("connected", deadline) for w in subs]
        span = time.monotonic() - t0
        cpu1 = proc_cpu_seconds(srv.pid)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if not out.exists():
        raise BenchError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
    total, owners, selfs, inclusive = _parse_raw(out)
    ok = sum(i["ok"] for i in infos)
    pct = {k: round(100 * v / total, 1) for k, v in owners.most_common()}
    server_cpu = (cpu1 or 0.0) - (cpu0 or 0.0)
    return {
        "connections": ok,
        "connections_per_s": round(ok / span, 1),
        "server_cpu_us_per_connection": round(1e6 * server_cpu / ok, 1) if ok else None,
        "samples": total,
        "by_owner_pct": pct,
        "top_self_pct": {k: round(100 * v / total, 1) for k, v in selfs.most_common(25)},
        "top_inclusive_pct": {k: round(100 * v / total, 1) for k, v in inclusive.most_common(40)},
        "raw": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    ap.add_argument("what", choices=("cpu", "memory"))
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    own = ap.parse_args(argv)
    raise_nofile_limit()
    args = parse_args(["--no-save", *[part for e in own.env for part in ("--env", e)]])
    b = Bench(args)
    b.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        b.start_db()
        if own.what == "memory":
            result = memory(b, own.connections, own.concurrency)
        else:
            result = cpu(b, own.connections, own.concurrency, own.rate)
    finally:
        b.kill_all()
        b.stop_db()
    import json

    print(json.dumps(result, indent=1))
    log(f"server logs in {b.log_dir.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
