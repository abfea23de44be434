"""Benchmark orchestrator for realtime-service.

    .venv/bin/python -m tests.bench.run [--scenario fanout] [--runs 3] [--quick]

Starts an embedded PostgreSQL, applies the migrations, seeds users and diagnoses, then for every
run of every scenario starts a fresh server (`realtime-service serve`) and drives it from load
generator processes (`loadgen.py`). Each scenario prints ONE JSON line on stdout (progress goes
to stderr); the lines are also appended to tests/bench/results/<stamp>.jsonl. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Self

import jwt

from .loadgen import die_with_parent, loop_name, publisher_main, subscriber_main
from .stats import (
    machine_busy,
    machine_info,
    median,
    proc_cpu_seconds,
    proc_cpu_split,
    proc_rss_kb,
    raise_nofile_limit,
    summarize_latencies,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
SCENARIOS = ("fanout", "fanout_20", "many", "connect", "idle", "slow", "cluster", "workers", "redis_rtt", "storm",
             "storm_cluster", "workers_connect", "workers_storm")

# user i owns diagnosis i for 1..SEED_USERS; warm-up connections use the top of the range
SEED_USERS = 12_000
WARM_BASE = 11_000
WARM_CONNECTIONS = 20
OUTBOX_MAX_BYTES = 1_048_576  # the server's default REALTIME_OUTBOX_MAX_BYTES (we do not override it)

FULL: dict[str, dict[str, Any]] = {
    "fanout": {
        "subscribers": 1000,
        "publishes": 500,
        "rate": None,
        "publish_connections": 8,
    },
    "fanout_20": {
        "subscribers": 1000,
        "publishes": 500,
        "rate": 20.0,
        "publish_connections": 8,
    },
    "many": {
        "diagnoses": 500,
        "per_diagnosis": 4,
        "publishes": 2000,
        "publish_connections": 8,
    },
    "connect": {"connections": 2000, "concurrency": 200},
    "idle": {"connections": 5000, "hold_s": 10.0, "concurrency": 200},
    "slow": {
        "subscribers": 200,
        "publishes": 1000,
        "rate": 100.0,
        "message_bytes": 8192,
        "slow_rcvbuf": 4096,
        "publish_connections": 8,
    },
    "cluster": {"subscribers": 1000, "publishes": 500, "rate": None, "publish_connections": 8, "nodes": 2},
    "workers": {"subscribers": 1000, "publishes": 500, "rate": None, "publish_connections": 8, "workers": 2},
    "redis_rtt": {"subscribers": [2, 20, 200, 1000], "publishes": 200, "publish_connections": 4, "nodes": 2},
    "storm": {"clients": 5000, "nodes": 1, "rate": 100.0},
    "storm_cluster": {"clients": 5000, "nodes": 2, "rate": 100.0},
    "workers_connect": {"connections": 2000, "concurrency": 200, "workers": 2},
    "workers_storm": {"clients": 5000, "rate": 100.0, "workers": 2},
}
QUICK: dict[str, dict[str, Any]] = {
    "fanout": {"subscribers": 100, "publishes": 100},
    "fanout_20": {"subscribers": 100, "publishes": 40},
    "many": {"diagnoses": 50, "publishes": 200},
    "connect": {"connections": 300, "concurrency": 100},
    "idle": {"connections": 500, "hold_s": 3.0},
    "slow": {"subscribers": 30, "publishes": 800, "rate": 200.0},
    "cluster": {"subscribers": 100, "publishes": 100},
    "workers": {"subscribers": 100, "publishes": 100},
    "redis_rtt": {"subscribers": [2, 20, 100], "publishes": 50},
    "storm": {"clients": 300, "rate": 50.0},
    "storm_cluster": {"clients": 300, "rate": 50.0},
    "workers_connect": {"connections": 300, "concurrency": 100},
    "workers_storm": {"clients": 300, "rate": 50.0},
}

# metric -> (operator, value); printed beside the medians
TARGETS: dict[str, dict[str, tuple[str, Any]]] = {
    "fanout": {
        "server_cpu_us_per_msg": ("<=", 8.0),
        "delivered_per_s": (">=", 100_000),
        "latency_p99_ms": ("<=", 100.0),
        "lost": ("==", 0),
        "duplicated": ("==", 0),
    },
    "fanout_20": {
        "latency_p99_ms": ("<=", 20.0),
        "lost": ("==", 0),
        "duplicated": ("==", 0),
    },
    "many": {
        "publishes_per_s": (">=", 4000),
        "latency_p99_ms": ("<=", 10.0),
        "lost": ("==", 0),
    },
    "connect": {
        "connections_per_s": (">=", 1500),
        "connect_p99_ms": ("<=", 200.0),
        "failed": ("==", 0),
    },
    "idle": {"rss_kb_per_connection": ("<=", 11.0), "dropped": ("==", 0)},
    "slow": {
        "slow_client_closed_1013": ("==", True),
        "p99_ratio_vs_baseline": ("<=", 1.5),
        "rss_flat": ("==", True),
        "others_lost": ("==", 0),
    },
    # issue 8: at least 70 % of single-node fanout throughput, p99 within 2x, nothing lost, twice or out of order
    "cluster": {
        "throughput_vs_single_node": (">=", 0.7),
        "p99_vs_single_node": ("<=", 2.0),
        "lost": ("==", 0),
        "duplicated": ("==", 0),
        "order_breaks": ("==", 0),
    },
    "workers": {"lost": ("==", 0), "duplicated": ("==", 0), "order_breaks": ("==", 0)},
    "redis_rtt": {"lost": ("==", 0), "duplicated": ("==", 0)},
    # issue 11: a reconnect storm is absorbed: everyone back, the replica asked a handful of times, nothing lost
    "storm": {"lost": ("==", 0), "duplicated": ("==", 0), "never_back": ("==", 0),
              "replica_queries_for_reconnects": ("<=", 500)},
    "storm_cluster": {"lost": ("==", 0), "duplicated": ("==", 0), "never_back": ("==", 0),
                      "replica_queries_for_reconnects": ("<=", 500)},
    "workers_connect": {"failed": ("==", 0)},
    "workers_storm": {"lost": ("==", 0), "duplicated": ("==", 0), "never_back": ("==", 0)},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


class Timeout(BenchError):
    pass


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise Timeout(f"timed out after {self.seconds:.0f}s while {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0, token: str | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# --------------------------------------------------------------------------- processes


def _server_preexec() -> None:
    raise_nofile_limit()
    die_with_parent()


def kill_pid(pid: int, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Signal one PID, wait up to `grace` for it to go, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not Path(f"/proc/{pid}").exists() else 0
        if done:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Server:
    """One `realtime-service serve` subprocess on a free loopback port."""

    def __init__(self, bench: Bench, label: str, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.bench = bench
        self.label = label
        self.env_extra = dict(env or {})
        self.args = args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = bench.log_dir / f"server-{label}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        b = self.bench
        env = dict(os.environ)
        env.update(
            {
                "REALTIME_HOST": HOST,
                "REALTIME_PORT": str(self.port),
                "REALTIME_DATABASE_URL": b.dsn,
                "REALTIME_JWT_SECRET": b.secret,
                "REALTIME_LOG_LEVEL": "WARNING",
                "REALTIME_RATE_LIMIT": "1000",
                "REALTIME_RATE_BURST": "2000",
                "REALTIME_DB_POOL_MAX": "10",
                "REALTIME_DRAIN_PERIOD": "1",
                "REALTIME_SHUTDOWN_GRACE": "5",
            }
        )
        env.update(b.extra_env)
        env.update(self.env_extra)
        logf = open(self.log_path, "wb")  # noqa: SIM115 - closed when the child has it
        try:
            self.proc = subprocess.Popen(
                [*b.server_cmd, *self.args],
                env=env,
                cwd=str(ROOT),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                preexec_fn=_server_preexec,
            )
        finally:
            logf.close()
        b.pids.add(self.proc.pid)
        end = time.monotonic() + 30.0
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"server exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                status, _ = http_get(self.port, "/healthz", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise BenchError(f"server did not answer /healthz within 30s:\n{self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            kill_pid(self.proc.pid, grace=8.0)
        self.bench.pids.discard(self.proc.pid)
        return self.proc.poll()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_problems(self, n: int = 5) -> list[str]:
        """The first distinct error-ish lines of the server log (tracebacks, ERROR, CRITICAL)."""
        out: list[str] = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for ln in lines:
            if any(k in ln for k in ("Traceback", "ERROR", "CRITICAL", "Error", "Exception")):
                s = ln.strip()[:300]
                if s not in out:
                    out.append(s)
            if len(out) >= n:
                break
        return out


class Worker:
    def __init__(self, name: str, proc: mp.process.BaseProcess, conn: Connection) -> None:
        self.name = name
        self.proc = proc
        self.conn = conn
        self.inbox: list[tuple[str, Any]] = []
        self.pid = proc.pid or 0

    def send(self, cmd: str, arg: Any = None) -> None:
        self.conn.send((cmd, arg))

    def expect(self, kind: str, deadline: Deadline) -> Any:
        for i, (k, v) in enumerate(self.inbox):
            if k == kind:
                del self.inbox[i]
                return v
        while True:
            left = deadline.left()
            if left <= 0:
                raise Timeout(f"timed out waiting for {kind!r} from {self.name}")
            if not self.proc.is_alive() and not self.conn.poll():
                raise BenchError(f"{self.name} died (exit code {self.proc.exitcode}) before {kind!r}")
            if self.conn.poll(min(left, 0.5)):
                try:
                    k, v = self.conn.recv()
                except EOFError as e:
                    raise BenchError(f"{self.name} closed its pipe before {kind!r}") from e
                if k == kind:
                    return v
                self.inbox.append((k, v))


class Fleet:
    """Load-generator processes of one run; all killed (by PID) on exit."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.workers: list[Worker] = []

    def start(
        self,
        name: str,
        target: Callable[[Connection, dict[str, Any]], None],
        cfg: dict[str, Any],
    ) -> Worker:
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, cfg), name=name, daemon=True)
        proc.start()
        child.close()
        w = Worker(name, proc, parent)
        self.workers.append(w)
        self.bench.pids.add(w.pid)
        return w

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError, ValueError):
                w.send("exit")
        end = time.monotonic() + 2.0
        for w in self.workers:
            w.proc.join(max(0.0, end - time.monotonic()))
        for w in self.workers:
            if w.proc.is_alive():
                kill_pid(w.pid, grace=1.0)
                w.proc.join(1.0)
            self.bench.pids.discard(w.pid)
            w.conn.close()
        self.workers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- bench context


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.secret = secrets.token_urlsafe(32)
        self.dsn = ""
        self.pg: Any = None
        self.pg_dir: str | None = None
        self.pids: set[int] = set()
        self.stamp = time.strftime("%Y%m%dT%H%M%S")
        self.log_dir = RESULTS / self.stamp
        self.server_cmd: list[str] = args.server_cmd.split() if args.server_cmd else default_server_cmd()
        self.extra_env: dict[str, str] = dict(kv.split("=", 1) for kv in args.env)
        self.machine = machine_info()
        self._tokens: dict[int, str] = {}
        self.workers = max(1, args.workers)
        self.use_uvloop = not args.no_uvloop
        self.redis: Any = None  # a private redis-server for the scale-out scenarios (cluster.py), started on demand
        self.service_token = jwt.encode(
            {
                "sub": "bench",
                "scope": "realtime:publish",
                "exp": int(time.time()) + 6 * 3600,
            },
            self.secret,
            algorithm="HS256",
        )

    def token(self, user: int) -> str:
        t = self._tokens.get(user)
        if t is None:
            t = jwt.encode(
                {"sub": str(user), "exp": int(time.time()) + 6 * 3600},
                self.secret,
                algorithm="HS256",
            )
            self._tokens[user] = t
        return t

    # database
    def start_db(self) -> None:
        import psycopg2

        if self.args.dsn:
            self.dsn = self.args.dsn
        else:
            try:
                from realtime_service.db.embedded import EmbeddedPostgres
            except ImportError as e:  # pragma: no cover - while the service is being written
                raise BenchError(f"realtime_service.db.embedded is not importable yet: {e}") from e
            self.pg_dir = tempfile.mkdtemp(prefix="rtbench-pg-")
            os.chmod(self.pg_dir, 0o755)
            log(f"starting embedded PostgreSQL in {self.pg_dir}")
            self.pg = EmbeddedPostgres(Path(self.pg_dir) / "data", durable=False)
            self.dsn = self.pg.start()
        from realtime_service.db.migrate import apply_migrations

        apply_migrations(self.dsn)
        conn = psycopg2.connect(self.dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO users (id) SELECT g FROM generate_series(1, %s) g ON CONFLICT DO NOTHING",
                    (SEED_USERS,),
                )
                cur.execute(
                    "INSERT INTO diagnoses (id, user_id) SELECT g, g FROM generate_series(1, %s) g "
                    "ON CONFLICT DO NOTHING",
                    (SEED_USERS,),
                )
                cur.execute("ANALYZE users")
                cur.execute("ANALYZE diagnoses")
        finally:
            conn.close()
        log(f"database ready ({SEED_USERS} users, {SEED_USERS} diagnoses; user i owns diagnosis i)")

    def stop_db(self) -> None:
        if self.pg is not None:
            try:
                self.pg.stop()
            except Exception as e:
                log(f"stopping PostgreSQL failed: {e}")
            self.pg = None
        if self.pg_dir and not self.args.keep:
            shutil.rmtree(self.pg_dir, ignore_errors=True)

    @contextlib.contextmanager
    def server(self, label: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Iterator[Server]:
        s = Server(self, label, env, args)
        try:
            s.start()
            yield s
        finally:
            s.stop()

    def kill_all(self) -> None:
        for pid in list(self.pids):
            kill_pid(pid, grace=2.0)
            self.pids.discard(pid)

    # helpers for runs
    def sub_specs(self, diagnoses: list[int], device_prefix: str | None = None) -> list[tuple[int, str, str | None]]:
        return [(d, self.token(d), f"{device_prefix}{i}" if device_prefix else None) for i, d in enumerate(diagnoses)]

    def start_subscribers(
        self,
        fleet: Fleet,
        server: Server,
        specs: list[tuple[int, str, str | None]],
        *,
        expected: dict[int, int] | None = None,
        concurrency: int = 200,
        deadline_s: float = 300.0,
        slow: tuple[int, str, str | None] | None = None,
        slow_rcvbuf: int | None = None,
        workers: int | None = None,
    ) -> list[Worker]:
        nw = max(1, min(workers or self.workers, len(specs)))
        parts: list[list[tuple[int, str, str | None]]] = [specs[i::nw] for i in range(nw)]
        out = []
        for i, part in enumerate(parts):
            cfg: dict[str, Any] = {
                "host": HOST,
                "port": server.port,
                "subs": part,
                "expected": expected or {},
                "concurrency": max(1, concurrency // nw),
                "deadline_s": deadline_s,
                "uvloop": self.use_uvloop,
            }
            if slow is not None and i == 0:
                cfg["subs"] = [*part, slow]
                cfg["slow_index"] = len(part)
                cfg["slow_rcvbuf"] = slow_rcvbuf
            out.append(fleet.start(f"subscribers-{i}", subscriber_main, cfg))
        return out

    def warm_up(self, fleet: Fleet, server: Server, deadline: Deadline) -> None:
        """A few connections to other diagnoses, then closed: loads lazy code paths and the DB pool."""
        specs = self.sub_specs(list(range(WARM_BASE + 1, WARM_BASE + 1 + WARM_CONNECTIONS)))
        (w,) = self.start_subscribers(fleet, server, specs, workers=1, deadline_s=60.0)
        w.expect("ready", deadline)
        w.send("go")
        info = w.expect("connected", deadline)
        if info["failed"]:
            raise BenchError(f"warm-up connections failed: {info['failures']}\n{server.log_tail()}")
        w.send("exit")
        w.proc.join(5.0)


def default_server_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "realtime-service"
    if exe.exists():
        return [str(exe), "serve"]
    found = shutil.which("realtime-service")
    if found:
        return [found, "serve"]
    return [sys.executable, "-m", "realtime_service", "serve"]


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    """utime+stime per named PID, plus '<name>.sys' (stime alone)."""
    out: dict[str, float | None] = {}
    for name, pid in pids.items():
        split = proc_cpu_split(pid)
        out[name] = None if split is None else split[0] + split[1]
        out[f"{name}.sys"] = None if split is None else split[1]
    mb = machine_busy()
    out["machine"] = None if mb is None else mb[0]
    out["machine.steal"] = None if mb is None else mb[1]
    return out


def interference(cpu: dict[str, float | None], window: float) -> dict[str, Any]:
    """CPU that processes outside the benchmark used during the window (other jobs on the machine
    make every figure worse; see README), and hypervisor steal."""
    ours = sum(v or 0.0 for k, v in cpu.items() if "." not in k and k != "machine")
    busy = cpu.get("machine")
    steal = cpu.get("machine.steal")
    other = None if busy is None else max(0.0, busy - ours)
    return {
        "other_processes_cpu_pct": None if other is None else round(100 * other / window, 1),
        "steal_cpu_pct": None if steal is None else round(100 * steal / window, 1),
        "loadavg_1m": os.getloadavg()[0],
    }


def cpu_delta(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in a.items():
        w = b.get(k)
        out[k] = None if v is None or w is None else round(w - v, 3)
    return out


def lat_from(results: list[dict[str, Any]], key: str = "lat") -> array[float]:
    lat: array[float] = array("d")
    for r in results:
        lat.frombytes(r[key])
    return lat


def _gapless(offsets: dict[int, list[int]]) -> bool:
    return all(sorted(v) == list(range(1, len(v) + 1)) for v in offsets.values())


# --------------------------------------------------------------------------- broadcast runs


def run_broadcast(
    b: Bench,
    label: str,
    *,
    diagnoses: list[int],
    per_diagnosis: int,
    plan: list[int],
    rate: float | None,
    message_bytes: int = 0,
    publish_connections: int = 8,
    slow_rcvbuf: int | None = None,
    sample: bool = False,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Subscribers on `diagnoses` (x per_diagnosis), publishes per `plan`, optional slow client."""
    deadline = Deadline(timeout)
    sub_diags = [d for d in diagnoses for _ in range(per_diagnosis)]
    expected = dict(Counter(plan))
    pad = max(0, message_bytes - 190) if message_bytes else 0  # ~190 bytes of frame around data.pad
    with b.server(label) as srv, Fleet(b) as fleet:
        b.warm_up(fleet, srv, deadline)
        specs = b.sub_specs(sub_diags, device_prefix="bench-")
        slow_spec = (diagnoses[0], b.token(diagnoses[0]), "bench-slow") if slow_rcvbuf else None
        subs = b.start_subscribers(
            fleet,
            srv,
            specs,
            expected=expected,
            deadline_s=timeout + 30,
            slow=slow_spec,
            slow_rcvbuf=slow_rcvbuf,
        )
        pub = fleet.start(
            "publisher",
            publisher_main,
            {
                "host": HOST,
                "port": srv.port,
                "token": b.service_token,
                "connections": publish_connections,
                "deadline_s": timeout + 30,
                "uvloop": b.use_uvloop,
            },
        )
        for w in subs:
            w.expect("ready", deadline)
            w.send("go")
        conn_infos = [w.expect("connected", deadline) for w in subs]
        pub.expect("ready", deadline)
        connected = sum(c["ok"] for c in conn_infos)
        failures: Counter[str] = Counter()
        for c in conn_infos:
            failures.update(c["failures"])
        if connected == 0:
            raise BenchError(f"no subscriber could connect: {dict(failures)}\n{srv.log_tail()}")
        # warm the publish path on a diagnosis nobody watches
        pub.send("publish", {"plan": [WARM_BASE + WARM_CONNECTIONS + 1] * 10, "rate": None})
        warm = pub.expect("published", deadline)
        if warm["ok"] != 10:
            raise BenchError(
                f"warm-up publishes failed: {warm['statuses']} {warm['errors']} {warm['first_error']}\n{srv.log_tail()}"
            )
        time.sleep(0.2)
        pids = {
            "server": srv.pid,
            "publisher": pub.pid,
            **{w.name: w.pid for w in subs},
        }
        rss_before = proc_rss_kb(srv.pid)
        cpu0 = cpu_snapshot(pids)
        t0 = time.monotonic()
        pub.send(
            "publish",
            {"plan": plan, "rate": rate, "pad": pad},
        )
        waiting = {w.name for w in subs if expected}
        published: dict[str, Any] | None = None
        samples: list[list[float | int | None]] = []
        total_conns = connected  # as the server should count them (slow client included)
        slow_resumed_at: float | None = None
        next_sample = t0
        grace_end: float | None = None
        timed_out = False
        t_window_end = t0
        by_conn = {w.conn: w for w in [*subs, pub]}
        while True:
            ready = wait(list(by_conn), timeout=0.1)
            for c in ready:
                w = by_conn[c]  # type: ignore[index]
                try:
                    kind, arg = c.recv()  # type: ignore[union-attr]
                except EOFError as e:
                    raise BenchError(f"{w.name} died during the run\n{srv.log_tail()}") from e
                if kind == "done":
                    waiting.discard(w.name)
                    t_window_end = time.monotonic()
                elif kind == "published":
                    published = arg
                else:
                    w.inbox.append((kind, arg))
            now = time.monotonic()
            if published is not None and not waiting:
                break
            if sample and now >= next_sample:
                next_sample = now + 0.25
                conns = None
                with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                    st, body = http_get(srv.port, "/ws/status", timeout=1.0)
                    if st == 200:
                        conns = json.loads(body).get("connections")
                samples.append([round(now - t0, 2), proc_rss_kb(srv.pid), conns])
                if slow_spec is not None and slow_resumed_at is None and isinstance(conns, int) and conns < total_conns:
                    slow_resumed_at = now - t0
                    subs[0].send("resume_slow")
            if published is not None and grace_end is None:
                grace_end = now + max(10.0, 0.1 * (now - t0))
            if grace_end is not None and now > grace_end:
                timed_out = True
                t_window_end = now
                break
            if deadline.left() < 20 or not srv.alive():
                timed_out = True
                t_window_end = now
                break
        cpu1 = cpu_snapshot(pids)
        rss_after = proc_rss_kb(srv.pid)
        server_alive = srv.alive()
        if published is None:
            published = pub.expect("published", Deadline(10))
        offsets = published["offsets"]
        for w in subs:
            w.send(
                "stop",
                {
                    "offsets": offsets,
                    "slow_wait": 10.0 if slow_spec is not None else 0.0,
                },
            )
        results = [w.expect("result", Deadline(max(15.0, min(30.0, deadline.left())))) for w in subs]
        problems = srv.log_problems()
    cpu = cpu_delta(cpu0, cpu1)
    window = max(1e-9, t_window_end - t0)
    deliveries = sum(r["deliveries"] for r in results)
    lat = sorted(lat_from(results))
    t_last = max(r["t_last"] for r in results)
    t_first_send = published["t_first_send"]
    span = max(1e-9, t_last - t_first_send)
    expected_total = sum(r["expected_deliveries"] for r in results)
    sub_cpu = sum(v or 0.0 for k, v in cpu.items() if k.startswith("subscribers") and not k.endswith(".sys"))
    server_cpu = cpu["server"] or 0.0
    lats = summarize_latencies(lat)
    out: dict[str, Any] = {
        "subscribers_connected": connected,
        "connect_failures": dict(failures),
        "published_ok": published["ok"],
        "publish_statuses": published["statuses"],
        "publish_errors": published["errors"],
        "publish_first_error": published["first_error"],
        "publish_offsets_gapless": _gapless(offsets),
        "publish_elapsed_s": round(published["elapsed"], 3),
        "publishes_per_s": round(published["ok"] / max(1e-9, published["t_last_resp"] - t_first_send), 1),
        "publish_request_latency": published["request_latency"],
        "delivered_reported_by_server": published["delivered_reported"],
        "deliveries": deliveries,
        "expected_deliveries": expected_total,
        "delivered_per_s": round(deliveries / span, 1),
        "latency_p50_ms": lats["p50_ms"],
        "latency_p90_ms": lats["p90_ms"],
        "latency_p99_ms": lats["p99_ms"],
        "latency_max_ms": lats["max_ms"],
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "unexpected_offsets": sum(r["unexpected"] for r in results),
        "incomplete_subscribers": sum(r["incomplete_subscribers"] for r in results),
        "order_breaks": sum(r.get("order_breaks", 0) for r in results),
        "subscribers_closed_during_run": dict(sum((Counter(r["ended_during_run"]) for r in results), Counter())),
        "frame_bytes_avg": round(sum(r["bytes"] for r in results) / max(1, sum(r["frames"] for r in results))),
        "window_s": round(window, 3),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct": round(100 * server_cpu / window, 1),
        "server_cpu_us_per_msg": round(1e6 * server_cpu / deliveries, 2) if deliveries else None,
        "server_cpu_sys_share": round((cpu["server.sys"] or 0.0) / server_cpu, 2) if server_cpu else None,
        "loadgen_subscribers_cpu_us_per_msg": round(1e6 * sub_cpu / deliveries, 2) if deliveries else None,
        "loadgen_subscribers_cpu_s": round(sub_cpu, 3),
        "loadgen_subscribers_cpu_pct": round(100 * sub_cpu / window, 1),
        "loadgen_publisher_cpu_s": cpu["publisher"],
        "loadgen_publisher_cpu_pct": round(100 * (cpu["publisher"] or 0.0) / window, 1),
        **interference(cpu, window),
        "server_rss_kb_before": rss_before,
        "server_rss_kb_after": rss_after,
        "server_alive_after": server_alive,
        "timed_out": timed_out,
        "server_log_problems": problems,
    }
    if sample:
        out["rss_samples"] = samples
    if slow_spec is not None:
        slow = next((r["slow"] for r in results if r["slow"] is not None), None) or {}
        out["slow"] = {
            **{k: v for k, v in slow.items() if k != "t_end"},
            "status_drop_at_s": None if slow_resumed_at is None else round(slow_resumed_at, 2),
            "ended_at_s": round(slow["t_end"] - t0, 2) if slow.get("t_end") else None,
        }
    return out


def rss_growth_after(samples: list[list[Any]], t_limit: float) -> int | None:
    """RSS growth (kB) from the first sample at/after t_limit to the largest later sample."""
    after = [s for s in samples if s[0] >= t_limit and s[1] is not None]
    if len(after) < 2:
        return None
    return int(max(s[1] for s in after) - after[0][1])


# --------------------------------------------------------------------------- scenarios


def sc_fanout(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    n_pub = p["publishes"]
    rate = p["rate"]
    timeout = 120.0 + (n_pub / rate if rate else 0.0) + p["subscribers"] / 50
    return run_broadcast(
        b,
        f"{name}-{run}",
        diagnoses=[1],
        per_diagnosis=p["subscribers"],
        plan=[1] * n_pub,
        rate=rate,
        publish_connections=p["publish_connections"],
        timeout=timeout,
    )


def sc_many(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    diags = list(range(1, p["diagnoses"] + 1))
    plan = [diags[i % len(diags)] for i in range(p["publishes"])]
    return run_broadcast(
        b,
        f"{name}-{run}",
        diagnoses=diags,
        per_diagnosis=p["per_diagnosis"],
        plan=plan,
        rate=None,
        publish_connections=p["publish_connections"],
        timeout=180.0,
    )


def sc_connect(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    n = p["connections"]
    deadline = Deadline(120.0 + n / 50)
    with b.server(f"{name}-{run}") as srv, Fleet(b) as fleet:
        b.warm_up(fleet, srv, deadline)
        subs = b.start_subscribers(
            fleet,
            srv,
            b.sub_specs(list(range(1, n + 1))),
            concurrency=p["concurrency"],
            deadline_s=deadline.left(),
        )
        for w in subs:
            w.expect("ready", deadline)
        pids = {"server": srv.pid, **{w.name: w.pid for w in subs}}
        cpu0 = cpu_snapshot(pids)
        for w in subs:
            w.send("go")
        infos = [w.expect("connected", deadline) for w in subs]
        cpu1 = cpu_snapshot(pids)
        problems = srv.log_problems()
    cpu = cpu_delta(cpu0, cpu1)
    ok = sum(i["ok"] for i in infos)
    failures: Counter[str] = Counter()
    for i in infos:
        failures.update(i["failures"])
    span = max(1e-9, max(i["t_end"] for i in infos) - min(i["t_start"] for i in infos))
    lats = summarize_latencies(lat_from(infos))
    sub_cpu = sum(v or 0.0 for k, v in cpu.items() if k.startswith("subscribers") and not k.endswith(".sys"))
    server_cpu = cpu["server"] or 0.0
    return {
        "connected": ok,
        "failed": n - ok,
        "failures": dict(failures),
        "elapsed_s": round(span, 3),
        "connections_per_s": round(ok / span, 1),
        "connect_p50_ms": lats["p50_ms"],
        "connect_p90_ms": lats["p90_ms"],
        "connect_p99_ms": lats["p99_ms"],
        "connect_max_ms": lats["max_ms"],
        "connect_offsets": dict(sum((Counter(i["connect_offsets"]) for i in infos), Counter())),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct": round(100 * server_cpu / span, 1),
        "server_cpu_us_per_connection": round(1e6 * server_cpu / ok, 1) if ok else None,
        "server_cpu_sys_share": round((cpu["server.sys"] or 0.0) / server_cpu, 2) if server_cpu else None,
        "loadgen_cpu_s": round(sub_cpu, 3),
        "loadgen_cpu_pct": round(100 * sub_cpu / span, 1),
        **interference(cpu, span),
        "server_log_problems": problems,
    }


def sc_idle(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    n = p["connections"]
    hold = p["hold_s"]
    deadline = Deadline(120.0 + hold + n / 50)
    with b.server(f"{name}-{run}") as srv, Fleet(b) as fleet:
        b.warm_up(fleet, srv, deadline)
        time.sleep(1.0)
        rss0 = proc_rss_kb(srv.pid)
        subs = b.start_subscribers(
            fleet,
            srv,
            b.sub_specs(list(range(1, n + 1))),
            concurrency=p["concurrency"],
            deadline_s=deadline.left(),
        )
        for w in subs:
            w.expect("ready", deadline)
            w.send("go")
        infos = [w.expect("connected", deadline) for w in subs]
        ok = sum(i["ok"] for i in infos)
        rss_connected = proc_rss_kb(srv.pid)
        client_rss = sum(proc_rss_kb(w.pid) or 0 for w in subs)
        t0 = time.monotonic()
        samples: list[list[Any]] = []
        cpu0 = proc_cpu_seconds(srv.pid)
        while time.monotonic() - t0 < hold:
            time.sleep(min(1.0, max(0.0, hold - (time.monotonic() - t0))))
            samples.append([round(time.monotonic() - t0, 2), proc_rss_kb(srv.pid)])
        cpu1 = proc_cpu_seconds(srv.pid)
        rss1 = proc_rss_kb(srv.pid)
        hwm = proc_rss_kb(srv.pid, "VmHWM")
        alive = 0
        ended: Counter[str] = Counter()
        for w in subs:
            w.send("status")
        for w in subs:
            st = w.expect("status", deadline)
            alive += st["alive"]
            ended.update(st["ended"])
        server_count = None
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            stc, body = http_get(srv.port, "/ws/status")
            if stc == 200:
                server_count = json.loads(body).get("connections")
        problems = srv.log_problems()
    failures: Counter[str] = Counter()
    for i in infos:
        failures.update(i["failures"])
    per = (rss1 - rss0) / ok if ok and rss0 is not None and rss1 is not None else None
    return {
        "connected": ok,
        "connect_failures": dict(failures),
        "alive_after_hold": alive,
        "dropped": ok - alive,
        "ended_during_hold": dict(ended),
        "server_reported_connections": server_count,
        "server_rss_kb_before": rss0,
        "server_rss_kb_connected": rss_connected,
        "server_rss_kb_after_hold": rss1,
        "server_rss_kb_hwm": hwm,
        "rss_kb_per_connection": None if per is None else round(per, 2),
        "server_cpu_s_during_hold": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 3),
        "loadgen_rss_kb_per_connection": round(client_rss / ok, 2) if ok else None,
        "rss_samples": samples,
        "server_log_problems": problems,
    }


def sc_slow(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    n_pub = p["publishes"]
    rate = p["rate"]
    common = {
        "diagnoses": [1],
        "per_diagnosis": p["subscribers"],
        "plan": [1] * n_pub,
        "rate": rate,
        "message_bytes": p["message_bytes"],
        "publish_connections": p["publish_connections"],
        "sample": True,
        "timeout": 120.0 + (n_pub / rate if rate else 0.0),
    }
    base = run_broadcast(b, f"{name}-{run}-baseline", **common)
    slow = run_broadcast(b, f"{name}-{run}-slow", slow_rcvbuf=p["slow_rcvbuf"], **common)
    s = slow.get("slow", {})
    closed = s.get("ended") == "close" and s.get("close_code") == 1013 and s.get("close_reason") == "slow_consumer"
    frame = slow["frame_bytes_avg"] or p["message_bytes"]
    # by then an unbounded outbox would hold twice the configured limit
    t_limit = (2 * OUTBOX_MAX_BYTES / frame) / rate if rate else 0.5 * slow["window_s"]
    growth = rss_growth_after(slow.get("rss_samples", []), t_limit)

    def peak(r: dict[str, Any]) -> int | None:
        return max((x[1] for x in r.get("rss_samples", []) if x[1] is not None), default=None)

    pk_s, pk_b = peak(slow), peak(base)
    extra = None if pk_s is None or pk_b is None else pk_s - pk_b
    p99_s, p99_b = slow["latency_p99_ms"], base["latency_p99_ms"]
    return {
        "slow_client_closed_1013": closed,
        "slow_client": s,
        "others_p99_ms": p99_s,
        "baseline_p99_ms": p99_b,
        "p99_ratio_vs_baseline": round(p99_s / p99_b, 2) if p99_s is not None and p99_b else None,
        "others_p50_ms": slow["latency_p50_ms"],
        "baseline_p50_ms": base["latency_p50_ms"],
        "others_lost": slow["lost"],
        "others_duplicated": slow["duplicated"],
        "baseline_lost": base["lost"],
        "rss_growth_after_limit_kb": growth,
        "rss_limit_reached_at_s": round(t_limit, 2),
        "rss_peak_kb": pk_s,
        "baseline_rss_peak_kb": pk_b,
        "rss_peak_extra_vs_baseline_kb": extra,
        # flat: after the point where an unbounded buffer would hold 2x the limit, RSS grows < 2 MiB
        "rss_flat": None if growth is None else growth <= 2048,
        "rss_samples": slow.get("rss_samples"),
        "baseline_rss_samples": base.get("rss_samples"),
        "slow_run": {k: v for k, v in slow.items() if k not in ("rss_samples", "slow")},
        "baseline_run": {k: v for k, v in base.items() if k != "rss_samples"},
    }


def sc_storms(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    """storm, storm_cluster, workers_connect and workers_storm live in storm.py (issue 11)."""
    from .storm import RUNNERS as STORMS

    return STORMS[name](b, p, run, name)


def sc_scaleout(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    """cluster, workers and redis_rtt live in cluster.py (imported here so that cluster.py can import this)."""
    from .cluster import RUNNERS as SCALEOUT

    return SCALEOUT[name](b, p, run, name)


RUNNERS: dict[str, Callable[[Bench, dict[str, Any], int, str], dict[str, Any]]] = {
    "cluster": sc_scaleout,
    "workers": sc_scaleout,
    "redis_rtt": sc_scaleout,
    "storm": sc_storms,
    "storm_cluster": sc_storms,
    "workers_connect": sc_storms,
    "workers_storm": sc_storms,
    "fanout": sc_fanout,
    "fanout_20": sc_fanout,
    "many": sc_many,
    "connect": sc_connect,
    "idle": sc_idle,
    "slow": sc_slow,
}

DESCRIPTIONS = {
    "fanout": "N subscribers on one diagnosis; publishes at max rate over keep-alive connections",
    "fanout_20": "as fanout, at a fixed publish rate",
    "many": "diagnoses x subscribers each; publishes spread round-robin at max rate",
    "connect": "connections to distinct diagnoses (cold ownership cache), limited concurrency",
    "idle": "idle connections to distinct diagnoses held open; server RSS delta per connection",
    "slow": "fanout of ~8 KiB messages with one client that never reads (tiny SO_RCVBUF) vs a run without it",
    "cluster": "fanout through Redis: subscribers spread over 2 nodes, publishes sent to both; paired with a "
               "single-node in-memory fanout run of the same size",
    "workers": "fanout through Redis to `serve --workers 2` on one port, paired with one process on Redis",
    "redis_rtt": "Redis round trips and commands per publish as subscribers grow (2 nodes)",
    "storm": "clients with since/epoch/device on one node on Redis; SIGTERM (drain), a new process on the port; "
             "publishes throughout",
    "storm_cluster": "as storm with 2 nodes on Redis; node 0 gets SIGTERM and stays down, its clients move",
    "workers_connect": "the connect scenario on Redis: `serve --workers 2` beside one process",
    "workers_storm": "the storm scenario: `serve --workers 2` beside one process",
}


def check(op: str, target: Any, value: Any) -> bool | None:
    if value is None:
        return None
    if op == "<=":
        return bool(value <= target)
    if op == ">=":
        return bool(value >= target)
    return bool(value == target)


def summarize(
    name: str,
    params: dict[str, Any],
    runs: list[dict[str, Any]],
    b: Bench,
    errors: list[str],
) -> dict[str, Any]:
    targets = TARGETS.get(name, {})
    keys: list[str] = list(targets)
    for r in runs:
        for k, v in r.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    figures: dict[str, Any] = {}
    for k in keys:
        vals = [r.get(k) for r in runs]
        if all(isinstance(v, bool) or v is None for v in vals) and any(isinstance(v, bool) for v in vals):
            med: Any = all(v is True for v in vals)
        else:
            m = median(vals)
            med = round(m, 3) if isinstance(m, float) else m
        fig: dict[str, Any] = {"median": med, "runs": vals}
        if k in targets:
            op, tv = targets[k]
            fig["target"] = f"{op} {tv}"
            fig["ok"] = check(op, tv, med)
        figures[k] = fig
    oks = [f["ok"] for f in figures.values() if "ok" in f]
    warnings = []
    for i, r in enumerate(runs, 1):
        for key in ("other_processes_cpu_pct", "steal_cpu_pct"):
            v = r.get(key, r.get("slow_run", {}).get(key))
            if isinstance(v, (int, float)) and v > 10:
                warnings.append(f"run {i}: {key}={v}: other load on the machine, timings are pessimistic")
    conditions: dict[str, Any] = {
        **params,
        "runs": len(runs),
        "quick": b.args.quick,
        "loadgen_subscriber_processes": b.workers,
        "loadgen_loop": loop_name(b.use_uvloop),
        "loadgen_publisher_processes": 1 if name not in ("connect", "idle") else 0,
        "server_cmd": " ".join(Path(b.server_cmd[0]).name.split() + b.server_cmd[1:]),
        "server_env": {
            "REALTIME_LOG_LEVEL": "WARNING",
            "REALTIME_RATE_LIMIT": "1000",
            "REALTIME_RATE_BURST": "2000",
            "REALTIME_DB_POOL_MAX": "10",
            **b.extra_env,
        },
        "transport": "loopback 127.0.0.1, no compression, Bearer header auth",
        "warm_up": f"{WARM_CONNECTIONS} connections + 10 publishes to other diagnoses before measuring",
    }
    return {
        "scenario": name,
        "description": DESCRIPTIONS[name],
        "conditions": conditions,
        "machine": b.machine,
        "ok": (all(o is True for o in oks) if oks and not errors else False),
        "figures": figures,
        "errors": errors,
        "warnings": warnings,
        "per_run": runs,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--scenario",
        "-s",
        action="append",
        choices=[*SCENARIOS, "all"],
        help="repeatable; default all",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per scenario (default 3, or 1 with --quick)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small counts: proves the harness end to end",
    )
    ap.add_argument("--workers", type=int, default=1, help="subscriber processes (default 1)")
    ap.add_argument("--no-uvloop", action="store_true", help="run the load generator on plain asyncio")
    ap.add_argument("--dsn", help="use this PostgreSQL instead of an embedded one (it is seeded!)")
    ap.add_argument("--redis-url", help="Redis for cluster/workers/redis_rtt (default: a private redis-server)")
    ap.add_argument(
        "--server-cmd",
        help="command that runs the server (default: realtime-service serve)",
    )
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server environment",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SCENARIO.KEY=VALUE",
        help="override a size",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="overall limit in seconds (default 3600)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the PostgreSQL data folder")
    ap.add_argument(
        "--no-save",
        action="store_true",
        help="do not write tests/bench/results/<stamp>.jsonl",
    )
    return ap.parse_args(argv)


def scenario_params(name: str, args: argparse.Namespace) -> dict[str, Any]:
    p = dict(FULL[name])
    if args.quick:
        p.update(QUICK[name])
    for item in args.set:
        key, _, value = item.partition("=")
        sc, _, k = key.partition(".")
        if sc == name:
            p[k] = json.loads(value) if value not in ("", "None") else None
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(SCENARIOS) if not args.scenario or "all" in args.scenario else list(dict.fromkeys(args.scenario))
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    raise_nofile_limit()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise Timeout(f"overall limit of {args.timeout:.0f}s reached")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.timeout)))
    b = Bench(args)
    b.log_dir.mkdir(parents=True, exist_ok=True)
    out_file = None if args.no_save else RESULTS / f"{b.stamp}.jsonl"
    rc = 0
    try:
        b.start_db()
        for name in names:
            params = scenario_params(name, args)
            results: list[dict[str, Any]] = []
            errors: list[str] = []
            for i in range(1, runs + 1):
                log(f"{name} run {i}/{runs} {params}")
                t = time.monotonic()
                try:
                    results.append(RUNNERS[name](b, params, i, name))
                except Exception as e:
                    errors.append(f"run {i}: {type(e).__name__}: {str(e).strip()}")
                    if isinstance(e, (BenchError, OSError)):
                        log(f"{name} run {i} failed: {e}")
                    else:
                        log(f"{name} run {i} failed:\n{traceback.format_exc()}")
                    b.kill_all()
                log(f"{name} run {i} finished in {time.monotonic() - t:.1f}s")
            line = summarize(name, params, results, b, errors)
            text = json.dumps(line, separators=(",", ":"), default=str)
            print(text, flush=True)
            if out_file is not None:
                with open(out_file, "a") as f:
                    f.write(text + "\n")
            brief = {k: (v["median"], v.get("target")) for k, v in line["figures"].items() if "target" in v}
            log(f"{name}: ok={line['ok']} {brief}")
            if not line["ok"]:
                rc = 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        rc = 130
    except Timeout as e:
        log(str(e))
        rc = 124
    finally:
        signal.alarm(0)
        b.kill_all()
        if b.redis is not None:
            b.redis.stop()
        b.stop_db()
        if out_file is not None and out_file.exists():
            log(f"results appended to {out_file.relative_to(ROOT)}; server logs in {b.log_dir.relative_to(ROOT)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
