"""A bounded soak: clients connect and leave at random while publishes go on steadily; afterwards nothing leaked and
every message is accounted for on every connection.

    .venv/bin/python -m tests.soak.soak                       # 5 minutes, 1,000 clients at once (the default)
    .venv/bin/python -m tests.soak.soak --minutes 30 --clients 2000 --redis-url redis://127.0.0.1:6379/0

It starts the service the way `serve` does (tests/soak/server.py: `run_server` plus a stats socket), on an
embedded PostgreSQL unless `--database-url` names one, and drives it over loopback:

- `clients` agents each loop until the end: connect to a random diagnosis (a third of them resume a device that
  left earlier with `since`/`epoch`), stay for a random time (exponential, mean `--lifetime`), then check and
  leave (nine in ten with a close handshake, one in ten by cutting the TCP connection);
- a publisher posts `--rate` messages a second to random diagnoses, and notes the newest offset answered 200;
- the check before leaving: an application `ping`; when its `pong` arrives, the connection must hold every
  broadcast from its start (the `connect` offset + 1, or `since` + 1 with `recovered: true`) up to at least the
  newest offset answered before the ping was sent, each once, in order.

Before (after a warm-up round and bursts of simultaneous publishes, so pools and caches have grown once to their
high-water mark) and after (once every client has left), it
reads the server's resident memory, open descriptors and asyncio tasks (stats socket), its replica connections
(pg_stat_activity) and, with Redis, its Redis connections (CLIENT LIST). Descriptors, tasks and connections must
match; memory must come back within `MEMORY_SLACK` of its baseline. The server's log must hold no error.
Exit status 0 when everything held; the report is printed as JSON too (`--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2

from tests.support import SECRET, Client, Seeder, Tokens

ROOT = Path(__file__).resolve().parents[2]
MEMORY_SLACK = (16 * 1024 * 1024, 0.20)  # after <= before + max(16 MiB, 20 %)
# Objects the cycle collector had to free, per connection served. A connection whose objects form a reference
# cycle leaves all of them to the collector, which under churn let the memory climb by tens of MiB that the
# allocators then kept (issue 9: 42 objects a connection, +45 MiB after one minute of 13,500 connections). With no
# cycle left it is about 0.1 (aiopg's cursor of a replica query, now and then).
GARBAGE_PER_CONNECTION = 5
SETTLE = 30.0  # seconds the server may take to free everything after the last client left
POOL = 4  # replica pool fixed in size (min = max) so its count is comparable before and after
WAIT = 15.0


@dataclass
class Config:
    duration: float = 300.0
    clients: int = 1000
    lifetime: float = 20.0  # mean seconds a client stays
    rate: float = 20.0  # publishes per second
    diagnoses: int = 20
    resume_share: float = 0.33
    drop_share: float = 0.1
    warmup: float = 0.0  # seconds; 0: a tenth of the duration, at least 5 s
    redis_url: str | None = None
    database_url: str | None = None
    seed: int = 9
    history_size: int = 1000  # retained per diagnosis: a resumed device must find what it missed
    linger: float = 35.0  # seconds of quiet before memory is read (the server's deferred clean-ups; CI: 0)


@dataclass
class Figures:
    rss_bytes: int = 0
    open_fds: int = 0
    asyncio_tasks: int = 0
    gc_objects: int = 0
    replica_connections: int = 0
    redis_connections: int | None = None
    hub_connections: int = 0
    memory_detail: dict[str, int] = field(default_factory=dict)  # resident by mapping kind, glibc's own account
    gc_collected: list[int] = field(default_factory=list)  # cyclic garbage found so far, by generation


@dataclass
class Report:
    config: dict[str, Any]
    minutes: float = 0.0
    connections: int = 0
    peak_clients: int = 0
    churn_per_second: float = 0.0
    resumed: int = 0
    dropped: int = 0
    checks: int = 0
    messages_received: int = 0
    messages_lost: int = 0
    duplicates: int = 0
    publishes_ok: int = 0
    publishes_failed: int = 0
    before: Figures = field(default_factory=Figures)
    after: Figures = field(default_factory=Figures)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# -- the server --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SoakServer:
    """tests/soak/server.py in a subprocess; its log goes to a file that is scanned for errors at the end."""

    def __init__(self, workdir: Path, dsn: str, redis_url: str | None, history_size: int = 1000) -> None:
        self.port = _free_port()
        self.stats_path = str(workdir / "stats.sock")
        self.log_path = workdir / "server.log"
        self.redis_prefix = f"soak{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
        env.update({"REALTIME_HOST": "127.0.0.1", "REALTIME_PORT": str(self.port), "REALTIME_DATABASE_URL": dsn,
                    "REALTIME_JWT_SECRET": SECRET, "REALTIME_LOG_LEVEL": "WARNING",
                    "REALTIME_DB_POOL_MIN": str(POOL), "REALTIME_DB_POOL_MAX": str(POOL),
                    "REALTIME_HISTORY_SIZE": str(history_size), "REALTIME_RATE_LIMIT": "100",
                    "REALTIME_RATE_BURST": "200",
                    "REALTIME_DRAIN_PERIOD": "1", "REALTIME_SHUTDOWN_GRACE": "10",
                    "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        if redis_url:
            env["REALTIME_REDIS_URL"] = redis_url
            env["REALTIME_REDIS_PREFIX"] = self.redis_prefix
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.soak.server", self.stats_path],
                                            env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        return self.process

    def stats_ready(self) -> bool:
        return Path(self.stats_path).exists()

    async def start(self, http: aiohttp.ClientSession) -> None:
        process = self.spawn()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the soak server exited at start:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{self.base_url}/readyz") as resp:
                    if resp.status == 200 and self.stats_ready():
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the soak server did not become ready:\n{self.log_tail()}")

    async def figures(self) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(self.stats_path)
        try:
            line = await asyncio.wait_for(reader.readline(), WAIT)
        finally:
            writer.close()
        return dict(json.loads(line))

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def errors(self) -> list[str]:
        """Log lines at WARNING or above, or with a traceback (the soak runs at WARNING: nothing should show)."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if any(f'"level":"{level}"' in line for level in ("WARNING", "ERROR", "CRITICAL")) or (
                        "Traceback" in line):
                    out.append(line[:400])
        return out


def replica_connections(dsn: str) -> int:
    """Sessions on the replica's database other than this one (the soak's seeder is idle when this runs)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


async def redis_connections(url: str) -> int:
    """Clients of the Redis server other than this one."""
    import redis.asyncio as redis

    client = redis.from_url(url)
    try:
        return len(await client.client_list()) - 1
    finally:
        await client.aclose()


# -- the load ----------------------------------------------------------------------------------------------------

@dataclass
class Departed:
    """A device that left, as a client would remember it to resume."""

    device: str
    last: int
    epoch: str


class Load:
    """The agents and the publisher of one phase, and what they saw."""

    def __init__(self, server: SoakServer, http: aiohttp.ClientSession, cfg: Config, report: Report,
                 dids: list[int], owners: dict[int, int], tokens: Tokens, rng: random.Random) -> None:
        self.server, self.http, self.cfg, self.report = server, http, cfg, report
        self.dids, self.owners, self.tokens, self.rng = dids, owners, tokens, rng
        self.newest: dict[int, int] = dict.fromkeys(dids, 0)
        self.departed: dict[int, list[Departed]] = {d: [] for d in dids}
        self.open_now = 0
        self.user_tokens = {d: tokens.user(owners[d], ttl=24 * 3600) for d in dids}
        self.service_token = tokens.service(ttl=24 * 3600)

    def fail(self, what: str) -> None:
        if len(self.report.failures) < 50:
            self.report.failures.append(what)

    async def run(self, seconds: float, clients: int, count: bool) -> None:
        end = time.monotonic() + seconds
        agents = [asyncio.create_task(self.agent(end, i * seconds / max(1, clients) / 4, count))
                  for i in range(clients)]
        publisher = asyncio.create_task(self.publisher(end, count))
        await asyncio.gather(publisher, *agents)

    async def saturate(self, publishes: int = 256) -> None:
        """Publishes all at once, so connection pools grow to their high-water mark before the baseline: a pool
        that grew once is not a leak; one that grows again would be. (The Redis client's pool is bounded at 64 and
        queues past it; every one of these must still be answered 200.)"""
        async def one(http: aiohttp.ClientSession, n: int) -> None:
            did = self.dids[n % len(self.dids)]
            async with http.post(f"{self.server.base_url}/api/v1/publish",
                                      json={"diagnosis_id": did, "type": "warmup", "data": {"n": n}},
                                      headers={"Authorization": f"Bearer {self.service_token}"},
                                      timeout=aiohttp.ClientTimeout(total=WAIT)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    self.fail(f"warm-up publish answered {resp.status}: {body}")
                else:
                    self.newest[did] = max(self.newest[did], body["offset"])

        # a session of its own, closed after: its keep-alive connections must not count in the baseline
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await asyncio.gather(*(one(http, n) for n in range(publishes)))

    async def publisher(self, end: float, count: bool) -> None:
        step = 1.0 / self.cfg.rate
        next_at = time.monotonic()
        n = 0
        while time.monotonic() < end:
            did = self.rng.choice(self.dids)
            n += 1
            try:
                async with self.http.post(f"{self.server.base_url}/api/v1/publish",
                                          json={"diagnosis_id": did, "type": "soak", "data": {"n": n}},
                                          headers={"Authorization": f"Bearer {self.service_token}"},
                                          timeout=aiohttp.ClientTimeout(total=WAIT)) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 200:
                        self.newest[did] = max(self.newest[did], body["offset"])
                        if count:
                            self.report.publishes_ok += 1
                    else:
                        self.report.publishes_failed += 1
                        self.fail(f"publish answered {resp.status}: {body}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.report.publishes_failed += 1
                self.fail(f"publish failed: {exc!r}")
            next_at += step
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # paced: `rate` a second

    async def agent(self, end: float, delay: float, count: bool) -> None:
        await asyncio.sleep(delay)  # the ramp: agents start spread over the first quarter
        while time.monotonic() < end:
            try:
                await self.visit(end, count)
            except Exception as exc:  # a failed visit is a finding; the agent goes on
                self.fail(f"{type(exc).__name__}: {exc}"[:400])
                await asyncio.sleep(0.5)

    async def visit(self, end: float, count: bool) -> None:
        did = self.rng.choice(self.dids)
        query: dict[str, str] = {}
        resume: Departed | None = None
        pool = self.departed[did]
        if pool and self.rng.random() < self.cfg.resume_share:
            resume = pool.pop(self.rng.randrange(len(pool)))
            query = {"device": resume.device, "since": str(resume.last), "epoch": resume.epoch}
        else:
            query = {"device": uuid.uuid4().hex[:12]}
        url = f"ws://127.0.0.1:{self.server.port}/ws/{did}"
        opened = time.monotonic()
        ws = await self.http.ws_connect(url, params=query, headers={"Authorization": f"Bearer {self.user_tokens[did]}"},
                                        autoping=True, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
        client = Client(ws).start()
        self.open_now += 1
        self.report.peak_clients = max(self.report.peak_clients, self.open_now)
        try:
            try:
                await client.wait(lambda c: c.frames, "the connect frame", WAIT)
            except AssertionError:
                raise AssertionError(f"no connect frame: closed {client.close_code} {client.close_reason!r}, "
                                     f"after {time.monotonic() - opened:.2f} s") from None
            hello = client.frames[0]
            if hello.get("type") != "connect":
                raise AssertionError(f"first frame {hello}")
            epoch = hello["data"]["epoch"]
            if resume is not None:
                replay = await client.next_of("reconnect_messages", WAIT)
                if replay["data"]["recovered"] is not True:
                    raise AssertionError(f"resume from {resume.last} not recovered: {replay['data']}")
                start = resume.last + 1
            else:
                start = hello["data"]["offset"] + 1
            await asyncio.sleep(min(self.rng.expovariate(1 / self.cfg.lifetime), max(0.0, end - time.monotonic())))
            # the check: everything answered before this ping must be here when its pong is
            target = self.newest[did]
            pongs = len(client.of_type("pong"))
            await client.send({"type": "ping"})
            await client.wait(lambda c: len(c.of_type("pong")) > pongs, "the pong", WAIT)
            got = client.offsets()
            last = max(got[-1] if got else start - 1, target)
            expected = list(range(start, last + 1))
            if got != expected:
                missing = len(set(expected) - set(got))
                dups = sum(n - 1 for n in Counter(got).values() if n > 1)
                self.report.messages_lost += missing
                self.report.duplicates += dups
                raise AssertionError(f"diagnosis {did}: expected {start}..{last}, missing {missing}, "
                                     f"duplicated {dups}, got {got[:5]}...{got[-5:]}")
            if count:
                self.report.connections += 1
                self.report.checks += 1
                self.report.messages_received += len(got)
                self.report.resumed += resume is not None
            self.departed[did].append(Departed(query["device"], last, epoch))
            if self.rng.random() < self.cfg.drop_share:
                connection = ws._response.connection  # cut the TCP connection: no close frame
                if connection is not None and connection.transport is not None:
                    connection.transport.abort()
                if count:
                    self.report.dropped += 1
                with contextlib.suppress(Exception):
                    await client.wait_closed(WAIT)
            else:
                await client.close()
        finally:
            self.open_now -= 1
            if not client.closed:
                with contextlib.suppress(Exception):
                    await client.close()


# -- the run -----------------------------------------------------------------------------------------------------

async def measure(server: SoakServer, http: aiohttp.ClientSession, dsn: str, redis_url: str | None) -> Figures:
    stats = await server.figures()
    if "traced_bytes" in stats:  # SOAK_TRACEMALLOC=1: where the memory is, for a failed memory check
        shown = {k: v for k, v in stats.items() if k != "top_allocations"}
        print(f"server memory: {shown}", file=sys.stderr)
    if "garbage_kinds" in stats:  # SOAK_GC_DEBUG=1
        print(f"cyclic garbage: {stats['garbage_objects']} objects: {stats['garbage_kinds']}", file=sys.stderr)
        print("\n".join(stats.get("garbage_cycles", [])), file=sys.stderr)
    if "top_allocations" in stats:
        print("top allocations:\n  " + "\n  ".join(stats["top_allocations"]), file=sys.stderr)
    async with http.get(f"{server.base_url}/ws/status") as resp:
        status = await resp.json()
    return Figures(rss_bytes=stats["rss_bytes"], open_fds=stats["open_fds"], asyncio_tasks=stats["asyncio_tasks"],
                   gc_objects=stats["gc_objects"], replica_connections=replica_connections(dsn),
                   redis_connections=await redis_connections(redis_url) if redis_url else None,
                   hub_connections=status["connections"],
                   memory_detail={**{f"rss_{k}": v for k, v in stats.get("mappings", {}).items()},
                                  **{k: v for k, v in stats.items() if k.startswith("malloc_")},
                                  "rss_peak": stats.get("rss_peak_bytes", 0)},
                   gc_collected=stats.get("gc_collected", []))


async def settled(server: SoakServer, http: aiohttp.ClientSession, dsn: str, redis_url: str | None,
                  baseline: Figures | None, linger: float = 0.0) -> Figures:
    """Figures once the server is quiet: no connection in the hub, and the counts either back at the baseline or
    (for the baseline itself) unchanged over two seconds, so sockets that are still closing are not counted."""
    deadline = time.monotonic() + SETTLE
    history: list[tuple[Any, ...]] = []
    while True:
        now = await measure(server, http, dsn, redis_url)
        counts = (now.open_fds, now.asyncio_tasks, now.replica_connections, now.redis_connections)
        history.append(counts)
        if baseline is not None:
            quiet = counts == (baseline.open_fds, baseline.asyncio_tasks, baseline.replica_connections,
                               baseline.redis_connections)
        else:
            quiet = len(history) >= 5 and len(set(history[-5:])) == 1
        if (quiet and now.hub_connections == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if linger:
        # the server's deferred clean-ups: a closed transport is aborted after 5 s, the head-deadline sweep forgets
        # closed connections every 30 sweeps; memory read before they ran would count what is about to be freed
        await asyncio.sleep(linger)
        now = await measure(server, http, dsn, redis_url)
    return now


async def soak(cfg: Config) -> Report:
    report = Report(config=asdict(cfg))
    rng = random.Random(cfg.seed)
    workdir = Path(tempfile.mkdtemp(prefix="realtime-soak-"))
    embedded = None
    try:
        if cfg.database_url is None:
            embedded, dsn = await asyncio.to_thread(_embedded_database, workdir)
        else:
            dsn = cfg.database_url
        from realtime_service.db.migrate import apply_migrations

        await asyncio.to_thread(apply_migrations, dsn)
        seeder, tokens = Seeder(dsn), Tokens()
        owners: dict[int, int] = {}
        for _ in range(cfg.diagnoses):
            uid, did = seeder.owned()
            owners[did] = uid
        server = SoakServer(workdir, dsn, cfg.redis_url, cfg.history_size)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await server.start(http)
            try:
                load = Load(server, http, cfg, report, list(owners), owners, tokens, rng)
                warmup = cfg.warmup or max(5.0, cfg.duration / 10)
                await load.run(warmup, cfg.clients, count=False)
                for _ in range(3):
                    await load.saturate()
                report.before = await settled(server, http, dsn, cfg.redis_url, None, cfg.linger)
                started = time.monotonic()
                await load.run(cfg.duration, cfg.clients, count=True)
                report.minutes = round((time.monotonic() - started) / 60, 2)
                report.after = await settled(server, http, dsn, cfg.redis_url, report.before, cfg.linger)
            finally:
                code = server.stop()
        report.churn_per_second = round(report.connections / max(1.0, cfg.duration), 1)
        judge(report, code, server)
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _embedded_database(workdir: Path) -> tuple[Any, str]:
    """An embedded PostgreSQL in the soak's folder (as the tests' default one), and its DSN."""
    from realtime_service.db.embedded import EmbeddedPostgres

    workdir.chmod(0o755)  # as root, the server's system user must reach the data folder inside
    embedded = EmbeddedPostgres(workdir / "pgdata", durable=False, settings={"max_connections": "200"})
    return embedded, embedded.start()


def judge(report: Report, exit_code: int | None, server: SoakServer) -> None:
    before, after = report.before, report.after
    for name in ("open_fds", "asyncio_tasks", "replica_connections", "redis_connections", "hub_connections"):
        if name == "hub_connections":
            if after.hub_connections:
                report.failures.append(f"{after.hub_connections} connection(s) still in the hub")
        elif getattr(after, name) != getattr(before, name):
            report.failures.append(f"{name}: {getattr(before, name)} before, {getattr(after, name)} after")
    garbage = garbage_per_connection(report)
    if garbage is not None and garbage > GARBAGE_PER_CONNECTION:
        report.failures.append(f"cyclic garbage: {garbage:.1f} objects per connection served (at most "
                               f"{GARBAGE_PER_CONNECTION}); SOAK_GC_DEBUG=1 names the cycles")
    slack = max(MEMORY_SLACK[0], int(before.rss_bytes * MEMORY_SLACK[1]))
    if after.rss_bytes > before.rss_bytes + slack:
        report.failures.append(f"memory: {before.rss_bytes} bytes before, {after.rss_bytes} after")
    if report.messages_lost or report.duplicates:
        report.failures.append(f"{report.messages_lost} lost, {report.duplicates} duplicated")
    if exit_code != 0:
        report.failures.append(f"the server exited {exit_code}")
    report.failures.extend(f"server log: {line}" for line in server.errors()[:10])


def garbage_per_connection(report: Report) -> float | None:
    """Objects the cycle collector freed during the measured run (up to the reading after it), per connection."""
    if not report.connections or not report.after.gc_collected:
        return None
    return (sum(report.after.gc_collected) - sum(report.before.gc_collected)) / report.connections


def summary(report: Report) -> str:
    b, a = report.before, report.after
    mib = 1024 * 1024
    lines = [
        f"soak: {report.minutes} min, {report.connections} connections ({report.peak_clients} at once, "
        f"{report.churn_per_second}/s churn, {report.resumed} resumed, {report.dropped} cut without a close)",
        f"  publishes answered 200: {report.publishes_ok}; failed: {report.publishes_failed}",
        f"  checks: {report.checks}; messages received {report.messages_received}; lost {report.messages_lost}; "
        f"duplicated {report.duplicates}",
        f"  memory {b.rss_bytes / mib:.1f} MiB before, {a.rss_bytes / mib:.1f} MiB after; fds {b.open_fds} -> "
        f"{a.open_fds}; tasks {b.asyncio_tasks} -> {a.asyncio_tasks}; replica connections "
        f"{b.replica_connections} -> {a.replica_connections}; redis connections {b.redis_connections} -> "
        f"{a.redis_connections}",
        "  memory by kind (MiB, before -> after): " + ", ".join(
            f"{k} {b.memory_detail.get(k, 0) / mib:.1f} -> {a.memory_detail.get(k, 0) / mib:.1f}"
            for k in sorted(set(b.memory_detail) | set(a.memory_detail)) if k != "rss_peak"),
        f"  cyclic garbage: {garbage_per_connection(report) or 0:.1f} objects per connection served; peak memory "
        f"{a.memory_detail.get('rss_peak', 0) / mib:.1f} MiB",
        "  result: " + ("held" if report.ok else "FAILED:\n    " + "\n    ".join(report.failures)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the measured run (default 5)")
    parser.add_argument("--clients", type=int, default=1000, help="clients connected at once (default 1000)")
    parser.add_argument("--lifetime", type=float, default=20.0, help="mean seconds a client stays (default 20)")
    parser.add_argument("--rate", type=float, default=20.0, help="publishes per second (default 20)")
    parser.add_argument("--diagnoses", type=int, default=20)
    parser.add_argument("--redis-url", help="use the Redis broker (a private key prefix is chosen)")
    parser.add_argument("--database-url", help="a migrated PostgreSQL (default: an embedded one)")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--linger", type=float, default=35.0,
                        help="seconds of quiet before memory is read, before and after (default 35)")
    parser.add_argument("--history-size", type=int, default=1000, help="REALTIME_HISTORY_SIZE (default 1000)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON too")
    args = parser.parse_args(argv)
    cfg = Config(duration=args.minutes * 60, clients=args.clients, lifetime=args.lifetime, rate=args.rate,
                 diagnoses=args.diagnoses, redis_url=args.redis_url, database_url=args.database_url, seed=args.seed,
                 history_size=args.history_size, linger=args.linger)
    report = asyncio.run(soak(cfg))
    print(summary(report))
    if args.json:
        print(json.dumps(asdict(report)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
