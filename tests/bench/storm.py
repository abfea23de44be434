"""The `storm` scenario (issue 11): thousands of clients reconnect at once, and nothing is lost or sent twice.

N clients (one per diagnosis, user i owns diagnosis i, each with its own `device`) are connected to nodes on one
Redis; a publisher sends broadcasts to their diagnoses at a fixed rate throughout. Then:

- `nodes=1`: the node gets SIGTERM (it drains: every client is closed 1012 `service_restart`, spread over
  REALTIME_DRAIN_PERIOD) and a new process is started on the same port, as a deploy does;
- `nodes=2`: node 0 gets SIGTERM and stays down; its clients move to node 1 (a client tries the next node
  after a failure, as behind a load balancer).

Every client reconnects with `?since=<last offset>&epoch=<epoch>&device=<device>`, after a random delay and
then exponential backoff with full jitter (0.1 s doubling to 2 s), the way a careful client does; it counts what
it got: the replay (`reconnect_messages`) and live broadcasts, per offset. Publishes that fail (the node
restarting) are retried with the same Idempotency-Key until they succeed, on the next node in turn, as the main
API would; so every publish that was answered has an offset, and every subscriber of its diagnosis must get it
exactly once.

Figures: `all_live_after_s` (from SIGTERM until the last dropped client has its `connect` again),
`downtime_p50_ms`/`p99`/`max` per dropped client, `refused` (attempts that did not get `connect`, by reason:
`refused_tcp` while no process listens, HTTP status and error code, close code and reason),
`replica_queries` (ownership queries the nodes sent during the storm, from `realtime_ownership_query_seconds`;
the restarted node's since its start), `lost`, `duplicated`, `order_breaks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import random
import re
import time
import uuid
from collections import Counter
from multiprocessing.connection import Connection as Pipe
from typing import Any

import orjson

from .loadgen import _Commands, _worker_boot, run_loop
from .run import HOST, Bench, BenchError, Deadline, Fleet, Server, http_get, log
from .stats import summarize_latencies
from .wire import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameParser, encode_client_frame

_loads = orjson.loads
_ERROR_CODE = re.compile(rb'"code"\s*:\s*"([a-z_]+)"')
_QUERIES = re.compile(r'^realtime_ownership_query_seconds_count\{result="[a-z]+"\} ([0-9.e+]+)$', re.M)


# -- the client side ----------------------------------------------------------------------------------------------


class StormClient:
    """One simulated client across its connections: what it received, where it is, how it fared."""

    __slots__ = ("counts", "device", "diagnosis_id", "down_at", "downtimes", "epoch", "last", "live", "node",
                 "order_breaks", "received", "token")

    def __init__(self, diagnosis_id: int, token: str, device: str, node: int) -> None:
        self.diagnosis_id = diagnosis_id
        self.token = token
        self.device = device
        self.node = node
        self.counts = bytearray(16)
        self.last = 0
        self.epoch = ""
        self.live = False
        self.down_at: float | None = None
        self.downtimes: list[float] = []
        self.order_breaks = 0
        self.received = 0

    def account(self, offset: int) -> None:
        counts = self.counts
        if offset >= len(counts):
            counts.extend(bytes(offset - len(counts) + 64))
        if counts[offset] < 255:
            counts[offset] += 1
        self.received += 1
        if offset != self.last + 1 and offset > self.last:
            self.order_breaks += 1  # a gap: something came before what precedes it
        elif offset <= self.last:
            self.order_breaks += 1  # older than what it already had (a duplicate, or out of order)
        self.last = max(self.last, offset)

    def path(self) -> str:
        query = f"device={self.device}"
        if self.epoch:
            query += f"&since={self.last}&epoch={self.epoch}"
        return f"/ws/{self.diagnosis_id}?{query}"


class StormProtocol(asyncio.Protocol):
    """One connection of a StormClient: handshake, then frames; answers PINGs (its PONGs confirm the cursor)."""

    def __init__(self, client: StormClient, host: str, port: int) -> None:
        self.client = client
        self.request = (f"GET {client.path()} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {client.token}\r\n\r\n").encode()
        self.transport: asyncio.Transport | None = None
        self.handshaking = True
        self.hbuf = b""
        self.parser = FrameParser()
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        self.connected.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.finished: asyncio.Future[str] = loop.create_future()  # how it ended, as a refusal/close label
        self.ended = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.handshaking:
            buf = self.hbuf + data
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.hbuf = buf
                return
            status = int(buf[9:12]) if buf[9:12].isdigit() else 0
            if status != 101:
                code = _ERROR_CODE.search(buf[i:i + 400])
                self.ended = f"http_{status}_{code.group(1).decode() if code else ''}"
                assert self.transport is not None
                self.transport.close()
                return
            self.handshaking = False
            data = buf[i + 4:]
            if not data:
                return
        for op, payload in self.parser.feed(data):
            if op == OP_TEXT:
                self.on_text(payload)
            elif op == OP_PING:
                self.send(OP_PONG, payload)
            elif op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.ended = f"close_{code}_{payload[2:].decode('utf-8', 'replace')}"
                self.send(OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return

    def on_text(self, payload: bytes) -> None:
        client = self.client
        try:
            msg = _loads(payload)
        except orjson.JSONDecodeError:
            return
        kind = msg.get("type")
        offset = msg.get("offset")
        if offset is not None:
            if msg.get("epoch") == client.epoch:
                client.account(int(offset))
        elif kind == "connect":
            data = msg["data"]
            if client.epoch and data["epoch"] != client.epoch:
                client.last = 0  # a new epoch: offsets start again (counted as loss by the orchestrator)
            client.epoch = data["epoch"]
            client.live = True
            if not self.connected.done():
                self.connected.set_result(None)
        elif kind == "reconnect_messages":
            for message in msg["data"]["messages"]:
                if message.get("offset") is not None and message.get("epoch") == client.epoch:
                    client.account(int(message["offset"]))

    def send(self, opcode: int, payload: bytes) -> None:
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.write(encode_client_frame(opcode, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.live = False
        if not self.ended:
            self.ended = "eof" if exc is None else ("reset" if isinstance(exc, ConnectionResetError)
                                                     else type(exc).__name__)
        if not self.finished.done():
            self.finished.set_result(self.ended)
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(self.ended))


async def _run_client(client: StormClient, ports: list[int], state: dict[str, Any], refused: Counter[str],
                      closes: Counter[str]) -> None:
    """Connect, and reconnect (backoff with full jitter, next node in turn) until told to stop.

    `state["t_last_back"]` is when the last dropped client got its `connect` again (CLOCK_MONOTONIC is system-wide,
    so the orchestrator can subtract its own SIGTERM time from it even while it was waiting for the node to exit).
    """
    loop = asyncio.get_running_loop()
    attempt = 0
    first = True
    while not state["stopping"]:
        port = ports[client.node % len(ports)]
        proto = StormProtocol(client, HOST, port)
        label = ""
        try:
            async with state["gate"]:  # the initial connect only: a storm is not limited by the client
                await asyncio.wait_for(loop.create_connection(lambda p=proto: p, HOST, port), 10)  # type: ignore[misc]
                await asyncio.wait_for(asyncio.shield(proto.connected), 15)
        except ConnectionRefusedError:
            label = "refused_tcp"
        except TimeoutError:
            label = "timeout"
            if proto.transport is not None:
                proto.transport.abort()
        except (ConnectionError, OSError) as exc:
            label = proto.ended or type(exc).__name__
        except Exception as exc:  # anything else is counted too; the client goes on trying
            label = f"client_error_{type(exc).__name__}"
            if proto.transport is not None:
                proto.transport.abort()
        if label:
            refused[label] += 1
            if label.startswith("close_1008"):
                return  # refused for good (forbidden, not found): a bug to report, not to retry
            attempt += 1
            client.node += 1  # try the next node, as a load balancer would
            await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2 ** attempt)))
            continue
        if client.down_at is not None:
            client.downtimes.append(loop.time() - client.down_at)
            client.down_at = None
            state["back"] += 1
            state["t_last_back"] = time.monotonic()
        if first:
            first = False
            state["connected"] += 1
        attempt = 0
        how = await proto.finished
        if state["stopping"]:
            return
        closes[how] += 1
        client.down_at = loop.time()
        state["dropped"] += 1
        await asyncio.sleep(random.uniform(0, 0.5))  # a careful client does not come back all at once


def storm_subscribers_main(pipe: Pipe, cfg: dict[str, Any]) -> None:
    import faulthandler

    faulthandler.enable()
    _worker_boot(cfg["deadline_s"])
    try:
        run_loop(_storm_subscribers(pipe, cfg), cfg.get("uvloop", True))
    finally:
        pipe.close()


async def _storm_subscribers(pipe: Pipe, cfg: dict[str, Any]) -> None:
    cmds = _Commands(pipe)
    ports: list[int] = cfg["ports"]
    clients = [StormClient(d, token, device, i) for i, (d, token, device) in enumerate(cfg["subs"])]
    state: dict[str, Any] = {"stopping": False, "connected": 0, "dropped": 0, "back": 0, "t_last_back": 0.0,
                             "gate": asyncio.Semaphore(cfg.get("concurrency", 200))}
    refused: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    tasks: list[asyncio.Task[None]] = []
    pipe.send(("ready", None))
    while True:
        cmd, arg = await cmds.get()
        if cmd == "go":
            tasks = [asyncio.create_task(_run_client(c, ports, state, refused, closes)) for c in clients]
            end = time.monotonic() + cfg.get("connect_within", 120.0)
            while state["connected"] < len(clients) and time.monotonic() < end:  # noqa: ASYNC110 - bounded
                await asyncio.sleep(0.05)
            state["gate"] = asyncio.Semaphore(1 << 30)  # from now on the storm is the server's to absorb
            pipe.send(("connected", {"ok": state["connected"], "refused": dict(refused)}))
            refused.clear()
        elif cmd == "status":
            pipe.send(("status", {"live": sum(c.live for c in clients), "dropped": state["dropped"],
                                  "back": state["back"], "t": state["t_last_back"]}))
        elif cmd == "stop":
            offsets: dict[int, list[int]] = {int(k): v for k, v in arg["offsets"].items()}
            end = time.monotonic() + arg.get("grace", 10.0)
            while time.monotonic() < end and not all(  # noqa: ASYNC110 - bounded
                    all(c.counts[o] if o < len(c.counts) else 0 for o in offsets.get(c.diagnosis_id, ()))
                    for c in clients):
                await asyncio.sleep(0.1)
            state["stopping"] = True
            lost = duplicated = unexpected = 0
            for c in clients:
                expected = set(offsets.get(c.diagnosis_id, ()))
                for o in expected:
                    n = c.counts[o] if o < len(c.counts) else 0
                    lost += n == 0
                    duplicated += max(0, n - 1)
                unexpected += sum(c.counts[o] for o in range(1, len(c.counts)) if o not in expected)
            downtimes = sorted(d for c in clients for d in c.downtimes)
            pipe.send(("result", {
                "lost": lost, "duplicated": duplicated, "unexpected": unexpected,
                "order_breaks": sum(c.order_breaks for c in clients),
                "received": sum(c.received for c in clients),
                "live_at_end": sum(c.live for c in clients),
                "never_back": sum(c.down_at is not None for c in clients),
                "refused": dict(refused), "closes": dict(closes),
                "downtime": summarize_latencies(downtimes), "dropped": state["dropped"],
                "resumed": len(downtimes)}))
            for t in tasks:
                t.cancel()
        elif cmd == "exit":
            return


# -- the publisher ------------------------------------------------------------------------------------------------


class _Http:
    """Raw keep-alive POSTs to whichever node answers; a failed request is retried by the caller."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.index = random.randrange(len(ports))
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            port = self.ports[self.index % len(self.ports)]
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
        assert self.reader is not None
        self.writer.write(raw.replace(b"{PORT}", b"%d" % self.ports[self.index % len(self.ports)]))
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head[9:12])
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
        body = await asyncio.wait_for(self.reader.readexactly(length), 10)
        if b"connection: close" in head.lower():
            self.drop()
        return status, body

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.index += 1


def storm_publisher_main(pipe: Pipe, cfg: dict[str, Any]) -> None:
    _worker_boot(cfg["deadline_s"])
    try:
        run_loop(_storm_publisher(pipe, cfg), cfg.get("uvloop", True))
    finally:
        pipe.close()


async def _storm_publisher(pipe: Pipe, cfg: dict[str, Any]) -> None:
    cmds = _Commands(pipe)
    ports: list[int] = cfg["ports"]
    diagnoses: list[int] = cfg["diagnoses"]
    rate: float = cfg["rate"]
    offsets: dict[int, list[int]] = {}
    statuses: Counter[str] = Counter()
    stopping = asyncio.Event()
    done = {"ok": 0, "retries": 0, "given_up": 0}
    pipe.send(("ready", None))
    cmd, _ = await cmds.get()
    if cmd != "go":
        return
    pool = [_Http(ports) for _ in range(cfg.get("connections", 4))]
    free: asyncio.Queue[_Http] = asyncio.Queue()
    for h in pool:
        free.put_nowait(h)

    async def publish_one(seq: int) -> None:
        diagnosis_id = diagnoses[seq % len(diagnoses)]
        body = orjson.dumps({"diagnosis_id": diagnosis_id, "type": "storm", "data": {"i": seq}})
        raw = (f"POST /api/v1/publish HTTP/1.1\r\nHost: {HOST}:{{PORT}}\r\nAuthorization: Bearer {cfg['token']}\r\n"
               f"Idempotency-Key: storm-{uuid.uuid4().hex}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        give_up = time.monotonic() + 60
        while True:
            h = await free.get()
            try:
                status, answer = await h.post(raw)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, AttributeError) as exc:
                h.drop()
                status, answer = 0, type(exc).__name__.encode()
            finally:
                free.put_nowait(h)
            statuses[str(status) if status else answer.decode()] += 1
            if status == 200:
                offsets.setdefault(diagnosis_id, []).append(int(_loads(answer)["offset"]))
                done["ok"] += 1
                return
            if time.monotonic() > give_up:
                done["given_up"] += 1
                return
            done["retries"] += 1
            h.drop()  # the next try goes to the next node
            await asyncio.sleep(0.05)

    async def schedule() -> None:
        t0 = time.monotonic()
        seq = 0
        running: set[asyncio.Task[None]] = set()
        while not stopping.is_set():
            delay = t0 + seq / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                continue
            task = asyncio.create_task(publish_one(seq))
            running.add(task)
            task.add_done_callback(running.discard)
            seq += 1
        if running:
            await asyncio.wait(running, timeout=70)

    runner = asyncio.create_task(schedule())
    while True:
        cmd, _ = await cmds.get()
        if cmd == "stop":
            stopping.set()
            await runner
            pipe.send(("published", {"offsets": offsets, "statuses": dict(statuses), **done}))
        elif cmd == "exit":
            return


# -- the orchestrator ---------------------------------------------------------------------------------------------


def replica_queries(port: int) -> float | None:
    """Ownership queries this node sent so far (ok and unavailable), from /metrics."""
    with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
        status, body = http_get(port, "/metrics", timeout=2.0)
        if status == 200:
            return sum(float(m) for m in _QUERIES.findall(body.decode()))
    return None


def run_storm(b: Bench, label: str, *, clients: int, nodes: int, rate: float, server_args: tuple[str, ...] = (),
              publish_diagnoses: int = 250, settle_s: float = 2.0, timeout: float = 300.0) -> dict[str, Any]:
    from .cluster import bench_redis, descendants

    deadline = Deadline(timeout)
    env = {"REALTIME_REDIS_URL": bench_redis(b), "REALTIME_REDIS_PREFIX": f"storm{uuid.uuid4().hex[:10]}"}
    servers = [Server(b, f"{label}-node{i}", env, server_args) for i in range(nodes)]
    started: list[Server] = []
    try:
        for s in servers:
            s.start()
            started.append(s)
        with Fleet(b) as fleet:
            for s in servers:
                b.warm_up(fleet, s, deadline)
            ports = [s.port for s in servers]
            diagnoses = list(range(1, clients + 1))
            specs = [(d, b.token(d), f"storm-{d}") for d in diagnoses]
            subs = fleet.start("storm-subscribers", storm_subscribers_main,
                               {"ports": ports, "subs": specs, "deadline_s": timeout + 60, "uvloop": b.use_uvloop})
            pub = fleet.start("storm-publisher", storm_publisher_main,
                              {"ports": ports, "diagnoses": diagnoses[::max(1, clients // publish_diagnoses)],
                               "rate": rate, "token": b.service_token,
                               "deadline_s": timeout + 60, "uvloop": b.use_uvloop})
            subs.expect("ready", deadline)
            pub.expect("ready", deadline)
            subs.send("go")
            connected = subs.expect("connected", deadline)
            if connected["ok"] < clients:
                raise BenchError(f"only {connected['ok']} of {clients} clients connected: {connected['refused']}\n"
                                 f"{servers[0].log_tail()}")
            log(f"storm: {clients} clients connected; publishing at {rate}/s")
            pub.send("go")
            time.sleep(1.0)
            q0 = [replica_queries(s.port) for s in servers]
            t_q0 = time.monotonic()
            time.sleep(settle_s)
            queries_before = [replica_queries(s.port) for s in servers]
            # the replica queries the publishes cost by themselves (their checks miss the cache too)
            steady_rate = sum((a or 0) - (q or 0) for a, q in zip(queries_before, q0, strict=True)) / max(
                1e-9, time.monotonic() - t_q0)
            victim = servers[0]
            victim_pids = [victim.pid, *descendants(victim.pid)]
            t_stop = time.monotonic()
            log(f"storm: SIGTERM to node 0 (pid {victim.pid})")
            victim.stop()  # SIGTERM; it drains, then exits (SIGKILL only after 8 s)
            t_exited = time.monotonic()
            restarted: Server | None = None
            if nodes == 1:
                restarted = Server(b, f"{label}-node0-restarted", env, server_args)
                restarted.port = victim.port
                restarted.start()
                started.append(restarted)
            t_restarted = time.monotonic()
            t_all_live: float | None = None
            samples = []
            give_up = time.monotonic() + 60.0
            while deadline.left() > 30 and time.monotonic() < give_up:
                subs.send("status")
                st = subs.expect("status", deadline)
                samples.append([round(time.monotonic() - t_stop, 2), st["live"]])
                if st["live"] == clients and st["back"] >= st["dropped"] and st["dropped"] > 0:
                    t_all_live = st["t"]
                    break
                time.sleep(0.1)
            time.sleep(settle_s)  # publishes go on to the clients that are back
            pub.send("stop")
            published = pub.expect("published", deadline)
            serving = [restarted] if restarted is not None else servers[1:]
            queries_after = [replica_queries(s.port) for s in serving]
            t_queries = time.monotonic() - (t_restarted if nodes == 1 else t_stop)
            subs.send("stop", {"offsets": published["offsets"], "grace": 15.0})
            result = subs.expect("result", Deadline(max(30.0, min(60.0, deadline.left()))))
            problems = [line for s in started for line in s.log_problems()]
    finally:
        for s in started:
            s.stop()
    if nodes == 1:
        queries = queries_after[0]
    else:
        before_survivors = queries_before[1:]
        queries = sum((a or 0) - (q or 0) for a, q in zip(queries_after, before_survivors, strict=True))
    refused = result["refused"]
    return {
        "nodes": nodes,
        "server_args": list(server_args),
        "clients": clients,
        "publish_rate": rate,
        "publish_diagnoses": len(diagnoses[::max(1, clients // publish_diagnoses)]),
        "all_live_after_s": None if t_all_live is None else round(t_all_live - t_stop, 2),
        "node_exited_after_s": round(t_exited - t_stop, 2),
        "node_restarted_after_s": round(t_restarted - t_stop, 2) if nodes == 1 else None,
        "dropped": result["dropped"],
        "resumed": result["resumed"],
        "never_back": result["never_back"],
        "downtime_p50_ms": result["downtime"]["p50_ms"],
        "downtime_p99_ms": result["downtime"]["p99_ms"],
        "downtime_max_ms": result["downtime"]["max_ms"],
        "refused_total": sum(refused.values()),
        "refused": refused,
        "closes": result["closes"],
        "replica_queries": queries,
        "replica_queries_per_s_before_stop": round(steady_rate, 1),
        # what admissions cost: the total less what the publishes alone asked at the rate seen before the stop
        "replica_queries_for_reconnects": None if queries is None else max(0, round(queries - steady_rate * t_queries)),
        "published_ok": published["ok"],
        "publish_retries": published["retries"],
        "publishes_given_up": published["given_up"],
        "publish_statuses": published["statuses"],
        "received": result["received"],
        "lost": result["lost"],
        "duplicated": result["duplicated"],
        "unexpected_offsets": result["unexpected"],
        "order_breaks": result["order_breaks"],
        "live_samples": samples[:: max(1, len(samples) // 60)],
        "victim_pids": victim_pids,
        "server_log_problems": problems[:10],
    }


def sc_storm(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    return run_storm(b, f"{name}-{run}", clients=p["clients"], nodes=p["nodes"], rate=p["rate"])


def run_connect(b: Bench, label: str, *, connections: int, concurrency: int, env: dict[str, str],
                server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The connect scenario against any server command line (CPU summed over a supervisor and its workers)."""
    from .cluster import descendants
    from .run import cpu_delta, cpu_snapshot, interference, lat_from

    deadline = Deadline(120.0 + connections / 50)
    with b.server(label, env, server_args) as srv, Fleet(b) as fleet:
        b.warm_up(fleet, srv, deadline)
        subs = b.start_subscribers(fleet, srv, b.sub_specs(list(range(1, connections + 1))),
                                   concurrency=concurrency, deadline_s=deadline.left())
        for w in subs:
            w.expect("ready", deadline)
        server_pids = {"server": srv.pid, **{f"worker{i}": pid for i, pid in enumerate(descendants(srv.pid))}}
        pids = {**server_pids, **{w.name: w.pid for w in subs}}
        queries0 = replica_queries(srv.port)
        cpu0 = cpu_snapshot(pids)
        for w in subs:
            w.send("go")
        infos = [w.expect("connected", deadline) for w in subs]
        cpu1 = cpu_snapshot(pids)
        queries1 = replica_queries(srv.port)
        problems = srv.log_problems()
    cpu = cpu_delta(cpu0, cpu1)
    ok = sum(i["ok"] for i in infos)
    failures: Counter[str] = Counter()
    for i in infos:
        failures.update(i["failures"])
    span = max(1e-9, max(i["t_end"] for i in infos) - min(i["t_start"] for i in infos))
    lats = summarize_latencies(lat_from(infos))
    server_cpu = sum(cpu[k] or 0.0 for k in server_pids)
    return {
        "server_args": list(server_args), "server_processes": len(server_pids),
        "connected": ok, "failed": connections - ok, "failures": dict(failures),
        "connections_per_s": round(ok / span, 1),
        "connect_p50_ms": lats["p50_ms"], "connect_p99_ms": lats["p99_ms"],
        "server_cpu_us_per_connection": round(1e6 * server_cpu / ok, 1) if ok else None,
        "server_cpu_pct": round(100 * server_cpu / span, 1),
        # /metrics answers for the worker that takes the request: with --workers, one worker's share
        "replica_queries_seen": None if queries0 is None or queries1 is None else queries1 - queries0,
        **interference(cpu, span),
        "server_log_problems": problems,
    }


def _redis_env(b: Bench) -> dict[str, str]:
    from .cluster import bench_redis

    return {"REALTIME_REDIS_URL": bench_redis(b), "REALTIME_REDIS_PREFIX": f"conn{uuid.uuid4().hex[:10]}"}


def _side_by_side(one: dict[str, Any], many: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = dict(many)
    for k in keys:
        out[f"one_process_{k}"] = one.get(k)
        a, c = many.get(k), one.get(k)
        if isinstance(a, (int, float)) and isinstance(c, (int, float)) and c:
            out[f"{k}_vs_one_process"] = round(a / c, 3)
    out["one_process"] = one
    return out


def sc_workers_connect(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    size = {"connections": p["connections"], "concurrency": p["concurrency"]}
    one = run_connect(b, f"{name}-{run}-one", env=_redis_env(b), **size)
    many = run_connect(b, f"{name}-{run}-workers", env=_redis_env(b), server_args=("--workers", str(p["workers"])),
                       **size)
    return _side_by_side(one, many, ("connections_per_s", "connect_p99_ms", "server_cpu_us_per_connection"))


def sc_workers_storm(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    one = run_storm(b, f"{name}-{run}-one", clients=p["clients"], nodes=1, rate=p["rate"])
    many = run_storm(b, f"{name}-{run}-workers", clients=p["clients"], nodes=1, rate=p["rate"],
                     server_args=("--workers", str(p["workers"])))
    return _side_by_side(one, many, ("all_live_after_s", "refused_total", "replica_queries", "downtime_p99_ms"))


RUNNERS = {"storm": sc_storm, "storm_cluster": sc_storm, "workers_connect": sc_workers_connect,
           "workers_storm": sc_workers_storm}
