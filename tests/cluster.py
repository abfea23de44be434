"""Multi-node harness (PROTOCOL 5): real `realtime-service serve` processes on one Redis and the test PostgreSQL.

Black-box on purpose: every node is a separate process started the way an operator starts it (environment
variables only), reached over loopback HTTP and WebSockets. Nothing here imports the broker, so the same
tests hold whatever the implementation does inside.

- `RedisProcess`: a private redis-server on a free loopback port that a fault test may stop, pause, flush or
  restart on the same port (the session `redis_url` must stay untouched, other modules share it).
- `NodeProcess`: one `serve` subprocess (its own free port, its log in a temp file shown on failure).
- `NodeSet`: two or three nodes on one Redis with one key prefix per test module.
- `Cluster`: what a test talks to: connect/publish/get on node *i*, with the session's tokens and seeder.
- `assert_gapless`, `Follower`: the received sequence checks (offsets strictly consecutive per connection,
  each once; a follower merges the connections of one logical client over reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import SECRET, Client, Seeder, Tokens

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=20)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def unique_prefix(name: str) -> str:
    """A REALTIME_REDIS_PREFIX no other module (or run) uses, so tests never see each other's keys."""
    return f"t{name}{uuid.uuid4().hex[:6]}"


# -- Redis --------------------------------------------------------------------------------------------------------


class RedisProcess:
    """A private redis-server that can be stopped, paused and restarted on the same port (with the same data dir).

    `appendonly=True` keeps history through a restart (appendfsync always: nothing acknowledged is lost, which a
    test that asserts "no gap after the restart" needs; production's everysec trades one second of it for speed).
    """

    def __init__(self, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (tests/run.sh installs it)")
        self.binary = binary
        self.appendonly = appendonly
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="realtime-test-redis-"))
        self.log_path = self.workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--bind", HOST, "--port", str(self.port), "--save", "", "--dir", str(self.workdir),
                   "--daemonize", "no", "--logfile", str(self.log_path)]
        if self.appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: LOADING the append-only file
                if self.command("PING") == "PONG":
                    return
            time.sleep(0.03)
        raise RuntimeError(f"redis-server did not start on {self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: Redis finishes its AOF and exits; clients see their connections refused until `start`."""
        if self.paused:
            self.resume()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no final AOF write; a restart loads whatever is on disk (the last SAVE without an AOF)."""
        if self.paused:
            self.resume()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a stalled primary)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def command(self, *args: str, timeout: float = 5.0) -> Any:
        """One command over a fresh connection (RESP), answered as a str, int or list; errors raise."""
        with socket.create_connection((HOST, self.port), timeout=timeout) as conn:
            parts = [f"*{len(args)}\r\n"] + [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            conn.sendall("".join(parts).encode())
            reader = conn.makefile("rb")
            return _read_resp(reader)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read_resp(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_resp(reader) for _ in range(count)]
    if kind == b"%":  # RESP3 map (not used by RESP2 clients, kept for completeness)
        count = int(rest)
        return {_read_resp(reader): _read_resp(reader) for _ in range(count)}
    raise RuntimeError(f"unexpected RESP line {line!r}")


# -- service nodes ------------------------------------------------------------------------------------------------


def node_env(*, dsn: str, redis_url: str | None, prefix: str, port: int, **overrides: Any) -> dict[str, str]:
    """The environment of one node, as an operator would give it (REALTIME_* variables only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    env.update({
        "REALTIME_HOST": HOST,
        "REALTIME_PORT": str(port),
        "REALTIME_DATABASE_URL": dsn,
        "REALTIME_JWT_SECRET": SECRET,
        "REALTIME_REDIS_PREFIX": prefix,
        "REALTIME_LOG_LEVEL": "INFO",
        "REALTIME_RATE_LIMIT": "1000",
        "REALTIME_RATE_BURST": "2000",
        "REALTIME_DRAIN_PERIOD": "0.5",
        "REALTIME_SHUTDOWN_GRACE": "5",
        "PYTHONUNBUFFERED": "1",
    })
    if redis_url is not None:
        env["REALTIME_REDIS_URL"] = redis_url
    for key, value in overrides.items():
        env[f"REALTIME_{key.upper()}"] = str(value)
    return env


class NodeProcess:
    """One `realtime-service serve` subprocess on its own loopback port."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.env = dict(env)
        self.port = int(self.env["REALTIME_PORT"])
        self.log_path = log_dir / f"{name}.log"
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, diagnosis_id: int | str, **query: Any) -> str:
        qs = "&".join(f"{k}={v}" for k, v in query.items() if v is not None)
        return f"ws://{HOST}:{self.port}/ws/{diagnosis_id}" + (f"?{qs}" if qs else "")

    def start(self, *, ready: bool = True) -> None:
        """Start and wait for /healthz (and /readyz unless `ready=False`, e.g. while Redis is down)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "realtime_service", "serve", *self.extra_args], env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.wait_status("/readyz" if ready else "/healthz", START_TIMEOUT)

    def wait_status(self, path: str, timeout: float, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"node {self.name} exited ({self.returncode}) at start:\n{self.log_tail()}")
            try:
                last = self.get(path, timeout=2)
                if last[0] == status:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"node {self.name}: {path} did not answer {status} in {timeout}s (last {last}):\n"
                           f"{self.log_tail()}")

    def get(self, path: str, timeout: float = 5.0, token: str | None = None) -> tuple[int, Any]:
        """A blocking GET (for set-up and tear-down; tests use `Cluster.get`)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye to Redis (a machine lost)."""
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait for the drain; SIGKILL if it outlasts `timeout`."""
        if self.alive:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class NodeSet:
    """`count` nodes on one Redis and one key prefix; restarted when a test killed one."""

    def __init__(self, count: int, *, dsn: str, redis_url: str, prefix: str, **env: Any) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="realtime-test-nodes-"))
        self.dsn = dsn
        self.redis_url = redis_url
        self.prefix = prefix
        self.env = env
        self.nodes = [self._make(i) for i in range(count)]

    def _make(self, index: int) -> NodeProcess:
        env = node_env(dsn=self.dsn, redis_url=self.redis_url, prefix=self.prefix, port=free_port(), **self.env)
        return NodeProcess(f"node{index}", env, self.log_dir)

    def start(self) -> None:
        for node in self.nodes:  # start them together, then wait for each
            with open(node.log_path, "ab") as log:
                node.process = subprocess.Popen([sys.executable, "-m", "realtime_service", "serve"], env=node.env,
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        for node in self.nodes:
            node.wait_status("/readyz", START_TIMEOUT)

    def ensure_running(self) -> None:
        """Restart (on the same port) any node a test killed, and wait until every node is ready."""
        for node in self.nodes:
            if not node.alive:
                node.start()
        for node in self.nodes:
            node.wait_status("/readyz", START_TIMEOUT)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.process is not None
                node.process.terminate()
        for node in self.nodes:
            node.terminate(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} (port {n.port}) ---\n{n.log_tail()}" for n in self.nodes)


@contextlib.contextmanager
def running_nodes(count: int, *, dsn: str, redis_url: str, prefix: str, **env: Any) -> Iterator[NodeSet]:
    nodes = NodeSet(count, dsn=dsn, redis_url=redis_url, prefix=prefix, **env)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


# -- what a test talks to -----------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP answer: status and parsed JSON body."""

    status: int
    body: Any

    @property
    def code(self) -> str | None:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return error.get("code") if isinstance(error, dict) else None


@dataclass
class Cluster:
    """The nodes of one test module, with an HTTP session for this test."""

    nodes: NodeSet
    http: aiohttp.ClientSession
    tokens: Tokens
    seed: Seeder
    clients: list[Client] = field(default_factory=list)

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes.nodes)

    async def open(self, index: int, diagnosis_id: int, token: str | None, **query: Any) -> Client:
        """Open a connection to node `index` (Bearer header); returns a started reader (maybe refused)."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        ws = await self.http.ws_connect(self[index].ws_url(diagnosis_id, **query), headers=headers, autoping=True,
                                        max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
        client = Client(ws).start()
        self.clients.append(client)
        return client

    async def connect(self, index: int, diagnosis_id: int, token: str, **query: Any) -> Client:
        """A connection that must be accepted: its first frame is `connect`."""
        client = await self.open(index, diagnosis_id, token, **query)
        await client.wait(lambda c: c.frames, f"the connect frame from node{index}")
        assert client.frames[0]["type"] == "connect", (client.frames[0], client.close_code, client.close_reason)
        return client

    async def post(self, index: int, path: str, body: Any, token: str | None = None,
                   headers: Mapping[str, str] | None = None) -> Answer:
        hdrs = {"Authorization": f"Bearer {token or self.tokens.service()}", **(headers or {})}
        async with self.http.post(f"{self[index].base_url}{path}", json=body, headers=hdrs,
                                  timeout=HTTP_TIMEOUT) as resp:
            return Answer(resp.status, await resp.json(content_type=None))

    async def publish(self, index: int, diagnosis_id: int, data: Any = None, type_: str = "test_event",
                      expect: int | None = 200, headers: Mapping[str, str] | None = None, **extra: Any) -> Answer:
        body = {"diagnosis_id": diagnosis_id, "type": type_, "data": {} if data is None else data, **extra}
        answer = await self.post(index, "/api/v1/publish", body, headers=headers)
        if expect is not None:
            assert answer.status == expect, (f"publish on node{index}", answer)
        return answer

    async def get(self, index: int, path: str, token: str | None = None) -> Answer:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with self.http.get(f"{self[index].base_url}{path}", headers=headers, timeout=HTTP_TIMEOUT) as resp:
            return Answer(resp.status, await resp.json(content_type=None))

    async def close_clients(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        self.clients.clear()


async def wait_until(condition: Any, what: str, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll an observable condition (an async callable) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        last = await condition()
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def sync(client: Client) -> None:
    """Round-trip an application ping: everything the client sent before has been handled, and what the server
    queued before the pong has arrived."""
    seen = len(client.of_type("pong"))
    await client.send({"type": "ping"})
    await client.wait(lambda c: len(c.of_type("pong")) > seen, "a pong")


async def drop(client: Client) -> None:
    """Cut the TCP connection without a close frame."""
    connection = client.ws._response.connection
    assert connection is not None and connection.transport is not None
    connection.transport.abort()
    await client.wait(lambda c: c.closed, "the client to see its own drop")


# -- received sequences -------------------------------------------------------------------------------------------


def broadcasts(client: Client) -> list[dict[str, Any]]:
    """Every broadcast frame the connection received (replayed and live), in the order received."""
    out: list[dict[str, Any]] = []
    for frame in client.frames:
        if frame.get("type") == "reconnect_messages":
            out.extend(m for m in frame["data"]["messages"] if isinstance(m.get("offset"), int))
        elif isinstance(frame.get("offset"), int):
            out.append(frame)
    return out


def personal(client: Client) -> list[dict[str, Any]]:
    """Personal frames (they carry a message_id and no offset), replayed and live."""
    out: list[dict[str, Any]] = []
    for frame in client.frames:
        if frame.get("type") == "reconnect_messages":
            out.extend(m for m in frame["data"]["messages"] if "message_id" in m)
        elif "message_id" in frame:
            out.append(frame)
    return out


def assert_gapless(offsets: list[int], first: int, last: int, what: str) -> None:
    """`offsets` is exactly first, first+1, ..., last: no gap, no duplicate, no reordering."""
    expected = list(range(first, last + 1))
    if offsets != expected:
        missing = sorted(set(expected) - set(offsets))
        counts = Counter(offsets)
        dups = sorted(o for o, n in counts.items() if n > 1)
        order = [(a, b) for a, b in itertools.pairwise(offsets) if b <= a][:5]
        raise AssertionError(f"{what}: expected offsets {first}..{last}; missing {missing[:20]} "
                             f"({len(missing)}), duplicated {dups[:20]}, out of order {order}, "
                             f"got {len(offsets)}: {offsets[:10]}...{offsets[-10:]}")


@dataclass
class Follower:
    """One logical client over reconnects: resumes with since/epoch (or its device cursor) and merges what its
    connections received, so that `offsets` is what the application saw, in order."""

    cluster: Cluster
    diagnosis_id: int
    token: str
    device: str
    mode: str = "since"  # "since": ?since=&epoch= on every reconnect; "cursor": only ?device=
    epoch: str | None = None
    last: int = 0
    offsets: list[int] = field(default_factory=list)
    recovered: list[bool] = field(default_factory=list)
    connections: list[tuple[int, Client]] = field(default_factory=list)
    client: Client | None = None

    async def connect(self, index: int) -> Client:
        query: dict[str, Any] = {"device": self.device}
        if self.mode == "since" and self.epoch is not None:
            query.update(since=self.last, epoch=self.epoch)
        client = await self.cluster.connect(index, self.diagnosis_id, self.token, **query)
        hello = client.frames[0]["data"]
        if self.epoch is None:
            self.epoch = hello["epoch"]
            if not self.connections:
                self.last = max(self.last, 0)
        self.client = client
        self.connections.append((index, client))
        return client

    def harvest(self) -> None:
        """Merge what the current connection received (call after it closed, or before reading `offsets`)."""
        if self.client is None:
            return
        for frame in self.client.frames:
            if frame.get("type") == "reconnect_messages":
                self.recovered.append(bool(frame["data"]["recovered"]))
        for frame in broadcasts(self.client):
            if frame.get("epoch") != self.epoch:
                self.epoch = frame["epoch"]
            self.offsets.append(frame["offset"])
            self.last = max(self.last, frame["offset"])
        self.client = None

    def seen(self) -> set[int]:
        current = [] if self.client is None else [f["offset"] for f in broadcasts(self.client)]
        return set(self.offsets) | set(current)
