"""Scale-out scenarios (issue 8): `cluster`, `workers` and `redis_rtt`, through a real Redis.

- `cluster`: the fanout scenario with subscribers spread round-robin over 2 `serve` nodes on one Redis and the
  publishes split between both nodes (each node's publisher gets half the plan and half the connections). Each
  run is paired with a single-node in-memory run of the same size, so `throughput_vs_single_node` and
  `p99_vs_single_node` compare like with like on the same machine at the same moment.
- `workers`: the same fanout through Redis to `serve --workers 2` on one port (the kernel spreads connections
  over the workers with SO_REUSEPORT), paired with one `serve` process on Redis.
- `redis_rtt`: 2 nodes, a few hundred publishes at several subscriber counts; how many Redis round trips and
  commands one publish costs, and whether that grows with subscribers.

Redis figures are deltas of `INFO stats` / `INFO commandstats` over the measured window:
`redis_reads_per_publish` is `total_reads_processed` (read events on client sockets: one per request or
pipelined batch, i.e. a round trip), `redis_commands_per_publish` is `total_commands_processed` (it counts the
commands a Lua script runs too), `evalsha_per_publish` the script calls. Both include the nodes' background
traffic during the window (presence beats, readiness probes), which is small at the default heartbeat.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import redis

from .loadgen import publisher_main, subscriber_main
from .run import (
    HOST,
    WARM_BASE,
    WARM_CONNECTIONS,
    Bench,
    BenchError,
    Deadline,
    Fleet,
    Server,
    Worker,
    _gapless,
    cpu_delta,
    cpu_snapshot,
    http_get,
    interference,
    lat_from,
    log,
)
from .stats import proc_rss_kb, summarize_latencies

SINGLE_KEYS = ("delivered_per_s", "latency_p50_ms", "latency_p99_ms", "lost", "duplicated", "order_breaks",
               "server_cpu_us_per_msg", "server_cpu_pct", "publishes_per_s", "other_processes_cpu_pct",
               "loadgen_subscribers_cpu_pct")


# -- Redis --------------------------------------------------------------------------------------------------------


def bench_redis(b: Bench) -> str:
    """The Redis URL for this bench: --redis-url, or a private redis-server without persistence (started once)."""
    if b.args.redis_url:
        return str(b.args.redis_url)
    if b.redis is None:
        from tests.cluster import RedisProcess

        b.redis = RedisProcess(appendonly=False)
        b.redis.start()
        log(f"started a private redis-server on port {b.redis.port}")
    return str(b.redis.url)


class RedisCounters:
    """INFO deltas of one Redis over a window."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        info = self.client.info("server")
        self.pid = int(info.get("process_id", 0)) or None
        self.version = str(info.get("redis_version"))

    def snapshot(self) -> dict[str, int]:
        stats = self.client.info("stats")
        out = {k: int(stats.get(k, 0)) for k in ("total_reads_processed", "total_writes_processed",
                                                   "total_commands_processed", "total_net_input_bytes",
                                                   "total_net_output_bytes")}
        for name, value in self.client.info("commandstats").items():
            if isinstance(value, dict):
                out[f"cmd:{name.removeprefix('cmdstat_')}"] = int(value.get("calls", 0))
        return out

    def close(self) -> None:
        self.client.close()


def redis_figures(before: dict[str, int], after: dict[str, int], publishes: int) -> dict[str, Any]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    per = max(1, publishes)
    commands = {k.removeprefix("cmd:"): v for k, v in delta.items() if k.startswith("cmd:") and v}
    return {
        "redis_reads_per_publish": round(delta["total_reads_processed"] / per, 2),
        "redis_commands_per_publish": round(delta["total_commands_processed"] / per, 2),
        "evalsha_per_publish": round((commands.get("evalsha", 0) + commands.get("eval", 0)) / per, 2),
        "redis_net_out_bytes_per_publish": round(delta["total_net_output_bytes"] / per),
        "redis_commands": dict(sorted(commands.items(), key=lambda kv: -kv[1])[:20]),
    }


# -- processes ----------------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the workers of `serve --workers N`)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                out.extend(children)
                todo.extend(children)
    return out


def _subscribers(b: Bench, fleet: Fleet, name: str, server: Server, specs: list[tuple[int, str, str | None]],
                 expected: dict[int, int], deadline_s: float) -> Worker:
    cfg: dict[str, Any] = {"host": HOST, "port": server.port, "subs": specs, "expected": expected,
                           "concurrency": 100, "deadline_s": deadline_s, "uvloop": b.use_uvloop}
    return fleet.start(name, subscriber_main, cfg)


def _merge_published(parts: list[dict[str, Any]]) -> dict[str, Any]:
    offsets: dict[int, list[int]] = {}
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for p in parts:
        for diag, offs in p["offsets"].items():
            offsets.setdefault(int(diag), []).extend(offs)
        statuses.update(p["statuses"])
        errors.update(p["errors"])
    return {
        "ok": sum(p["ok"] for p in parts),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "first_error": next((p["first_error"] for p in parts if p["first_error"]), None),
        "offsets": offsets,
        "delivered_reported": sum(p["delivered_reported"] for p in parts),
        "t_first_send": min(p["t_first_send"] for p in parts),
        "t_last_resp": max(p["t_last_resp"] for p in parts),
        "elapsed": max(p["elapsed"] for p in parts),
        "request_latency": [p["request_latency"] for p in parts],
    }


def run_spread(b: Bench, label: str, *, nodes: int, subscribers: int, publishes: int, rate: float | None,
               publish_connections: int, use_redis: bool, server_args: tuple[str, ...] = (),
               timeout: float = 240.0) -> dict[str, Any]:
    """`subscribers` on diagnosis 1 spread over `nodes` servers; `publishes` split between them."""
    deadline = Deadline(timeout)
    env: dict[str, str] = {}
    counters: RedisCounters | None = None
    if use_redis:
        env["REALTIME_REDIS_URL"] = bench_redis(b)
        env["REALTIME_REDIS_PREFIX"] = f"bench{uuid.uuid4().hex[:10]}"  # a fresh diagnosis 1 (offsets from 1)
        counters = RedisCounters(env["REALTIME_REDIS_URL"])
    expected = {1: publishes}
    try:
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(b.server(f"{label}-node{i}", env, server_args)) for i in range(nodes)]
            fleet = stack.enter_context(Fleet(b))
            for srv in servers:
                b.warm_up(fleet, srv, deadline)
            specs = b.sub_specs([1] * subscribers, device_prefix="bench-")
            subs = [_subscribers(b, fleet, f"subscribers-{i}", srv, specs[i::nodes], expected, timeout + 30)
                    for i, srv in enumerate(servers)]
            pubs = [fleet.start(f"publisher-{i}", publisher_main,
                                {"host": HOST, "port": srv.port, "token": b.service_token,
                                 "connections": max(1, publish_connections // nodes), "deadline_s": timeout + 30,
                                 "uvloop": b.use_uvloop})
                    for i, srv in enumerate(servers)]
            for w in subs:
                w.expect("ready", deadline)
                w.send("go")
            conn_infos = [w.expect("connected", deadline) for w in subs]
            for p in pubs:
                p.expect("ready", deadline)
            connected = sum(c["ok"] for c in conn_infos)
            failures: Counter[str] = Counter()
            for c in conn_infos:
                failures.update(c["failures"])
            if connected == 0:
                raise BenchError(f"no subscriber could connect: {dict(failures)}\n{servers[0].log_tail()}")
            for p in pubs:
                p.send("publish", {"plan": [WARM_BASE + WARM_CONNECTIONS + 1] * 10, "rate": None})
            for p in pubs:
                warm = p.expect("published", deadline)
                if warm["ok"] != 10:
                    raise BenchError(f"warm-up publishes failed: {warm['statuses']} {warm['first_error']}\n"
                                     f"{servers[0].log_tail()}")
            time.sleep(0.3)
            server_pids: dict[str, int] = {}
            for i, srv in enumerate(servers):
                server_pids[f"server{i}"] = srv.pid
                for j, child in enumerate(descendants(srv.pid)):
                    server_pids[f"server{i}w{j}"] = child
            pids = {**server_pids, **{w.name: w.pid for w in [*subs, *pubs]}}
            if counters is not None and counters.pid is not None and Path(f"/proc/{counters.pid}").exists():
                pids["redis"] = counters.pid
            rss_before = sum(proc_rss_kb(pid) or 0 for pid in server_pids.values())
            redis_before = counters.snapshot() if counters is not None else {}
            cpu0 = cpu_snapshot(pids)
            t0 = time.monotonic()
            share = [publishes // nodes + (1 if i < publishes % nodes else 0) for i in range(nodes)]
            for p, n in zip(pubs, share, strict=True):
                p.send("publish", {"plan": [1] * n, "rate": None if rate is None else rate / nodes})
            waiting = {w.name for w in subs}
            published: dict[str, dict[str, Any]] = {}
            by_conn = {w.conn: w for w in [*subs, *pubs]}
            grace_end: float | None = None
            timed_out = False
            t_window_end = t0
            while True:
                for c in wait(list(by_conn), timeout=0.1):
                    w = by_conn[c]  # type: ignore[index]
                    try:
                        kind, arg = c.recv()  # type: ignore[union-attr]
                    except EOFError as e:
                        raise BenchError(f"{w.name} died during the run\n{servers[0].log_tail()}") from e
                    if kind == "done":
                        waiting.discard(w.name)
                        t_window_end = time.monotonic()
                    elif kind == "published":
                        published[w.name] = arg
                    else:
                        w.inbox.append((kind, arg))
                now = time.monotonic()
                if len(published) == len(pubs) and not waiting:
                    break
                if len(published) == len(pubs) and grace_end is None:
                    grace_end = now + max(10.0, 0.1 * (now - t0))
                if (grace_end is not None and now > grace_end) or deadline.left() < 20 \
                        or not all(s.alive() for s in servers):
                    timed_out = True
                    t_window_end = now
                    break
            cpu1 = cpu_snapshot(pids)
            redis_after = counters.snapshot() if counters is not None else {}
            rss_after = sum(proc_rss_kb(pid) or 0 for pid in server_pids.values())
            for p in pubs:
                if p.name not in published:
                    published[p.name] = p.expect("published", Deadline(10))
            merged = _merge_published(list(published.values()))
            for w in subs:
                w.send("stop", {"offsets": merged["offsets"], "slow_wait": 0.0})
            results = [w.expect("result", Deadline(max(15.0, min(30.0, deadline.left())))) for w in subs]
            status_counts = []
            for srv in servers:
                with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                    st, body = http_get(srv.port, "/ws/status", timeout=2.0)
                    if st == 200:
                        status_counts.append(json.loads(body).get("connections"))
            problems = [line for srv in servers for line in srv.log_problems()]
            alive = all(s.alive() for s in servers)
    finally:
        if counters is not None:
            counters.close()
    cpu = cpu_delta(cpu0, cpu1)
    window = max(1e-9, t_window_end - t0)
    deliveries = sum(r["deliveries"] for r in results)
    lats = summarize_latencies(sorted(lat_from(results)))
    span = max(1e-9, max(r["t_last"] for r in results) - merged["t_first_send"])
    server_cpu = sum(cpu[k] or 0.0 for k in server_pids)
    server_sys = sum(cpu.get(f"{k}.sys") or 0.0 for k in server_pids)
    sub_cpu = sum(cpu[w.name] or 0.0 for w in subs)
    pub_cpu = sum(cpu[p.name] or 0.0 for p in pubs)
    out: dict[str, Any] = {
        "nodes": nodes,
        "server_args": list(server_args),
        "broker": "redis" if use_redis else "memory",
        "server_processes": len(server_pids),
        "subscribers_connected": connected,
        "subscribers_per_node": [c["ok"] for c in conn_infos],
        "connect_failures": dict(failures),
        "published_ok": merged["ok"],
        "publish_statuses": merged["statuses"],
        "publish_errors": merged["errors"],
        "publish_first_error": merged["first_error"],
        "publish_offsets_gapless": _gapless(merged["offsets"]),
        "publishes_per_s": round(merged["ok"] / max(1e-9, merged["t_last_resp"] - merged["t_first_send"]), 1),
        "publish_request_latency": merged["request_latency"],
        "delivered_reported_by_server": merged["delivered_reported"],
        "deliveries": deliveries,
        "expected_deliveries": sum(r["expected_deliveries"] for r in results),
        "delivered_per_s": round(deliveries / span, 1),
        "latency_p50_ms": lats["p50_ms"],
        "latency_p90_ms": lats["p90_ms"],
        "latency_p99_ms": lats["p99_ms"],
        "latency_max_ms": lats["max_ms"],
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "unexpected_offsets": sum(r["unexpected"] for r in results),
        "order_breaks": sum(r.get("order_breaks", 0) for r in results),
        "subscribers_with_order_breaks": sum(r.get("subscribers_with_order_breaks", 0) for r in results),
        "incomplete_subscribers": sum(r["incomplete_subscribers"] for r in results),
        "subscribers_closed_during_run": dict(sum((Counter(r["ended_during_run"]) for r in results), Counter())),
        "window_s": round(window, 3),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct": round(100 * server_cpu / window, 1),
        "server_cpu_us_per_msg": round(1e6 * server_cpu / deliveries, 2) if deliveries else None,
        "server_cpu_sys_share": round(server_sys / server_cpu, 2) if server_cpu else None,
        "redis_cpu_pct": round(100 * (cpu.get("redis") or 0.0) / window, 1) if "redis" in pids else None,
        "loadgen_subscribers_cpu_pct": round(100 * sub_cpu / window, 1),
        "loadgen_publisher_cpu_pct": round(100 * pub_cpu / window, 1),
        **interference(cpu, window),
        "server_rss_kb_before": rss_before,
        "server_rss_kb_after": rss_after,
        "status_connections_per_node": status_counts,
        "servers_alive_after": alive,
        "timed_out": timed_out,
        "server_log_problems": problems[:10],
    }
    if counters is not None:
        out["redis_version"] = counters.version
        out.update(redis_figures(redis_before, redis_after, merged["ok"]))
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def sc_cluster(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    size = {"subscribers": p["subscribers"], "publishes": p["publishes"], "rate": p["rate"],
            "publish_connections": p["publish_connections"]}
    single = run_spread(b, f"{name}-{run}-single", nodes=1, use_redis=False, **size)
    spread = run_spread(b, f"{name}-{run}-redis", nodes=p["nodes"], use_redis=True, **size)
    return {**spread,
            "throughput_vs_single_node": _ratio(spread["delivered_per_s"], single["delivered_per_s"]),
            "p99_vs_single_node": _ratio(spread["latency_p99_ms"], single["latency_p99_ms"]),
            "single_node_delivered_per_s": single["delivered_per_s"],
            "single_node_latency_p99_ms": single["latency_p99_ms"],
            "single_node": {k: single.get(k) for k in SINGLE_KEYS}}


def sc_workers(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    size = {"subscribers": p["subscribers"], "publishes": p["publishes"], "rate": p["rate"],
            "publish_connections": p["publish_connections"]}
    one = run_spread(b, f"{name}-{run}-one", nodes=1, use_redis=True, **size)
    many = run_spread(b, f"{name}-{run}-workers", nodes=1, use_redis=True,
                      server_args=("--workers", str(p["workers"])), **size)
    return {**many,
            "throughput_vs_one_process": _ratio(many["delivered_per_s"], one["delivered_per_s"]),
            "p99_vs_one_process": _ratio(many["latency_p99_ms"], one["latency_p99_ms"]),
            "one_process_delivered_per_s": one["delivered_per_s"],
            "one_process_latency_p99_ms": one["latency_p99_ms"],
            "one_process_redis_reads_per_publish": one.get("redis_reads_per_publish"),
            "one_process": {k: one.get(k) for k in (*SINGLE_KEYS, "redis_reads_per_publish",
                                                    "redis_commands_per_publish")}}


def sc_redis_rtt(b: Bench, p: dict[str, Any], run: int, name: str) -> dict[str, Any]:
    rows = []
    for n in p["subscribers"]:
        r = run_spread(b, f"{name}-{run}-{n}", nodes=p["nodes"], subscribers=n, publishes=p["publishes"],
                       rate=None, publish_connections=p["publish_connections"], use_redis=True)
        rows.append({"subscribers": n, **{k: r.get(k) for k in (
            "redis_reads_per_publish", "redis_commands_per_publish", "evalsha_per_publish",
            "redis_net_out_bytes_per_publish", "delivered_per_s", "latency_p99_ms", "lost", "duplicated",
            "order_breaks", "redis_cpu_pct", "redis_commands")}})
        log(f"redis_rtt {n} subscribers: {rows[-1]['redis_reads_per_publish']} reads, "
            f"{rows[-1]['redis_commands_per_publish']} commands per publish")
    first, last = rows[0], rows[-1]
    return {
        "by_subscribers": rows,
        "reads_per_publish_smallest": first["redis_reads_per_publish"],
        "reads_per_publish_largest": last["redis_reads_per_publish"],
        "reads_per_publish_growth": _ratio(last["redis_reads_per_publish"], first["redis_reads_per_publish"]),
        "commands_per_publish_growth": _ratio(last["redis_commands_per_publish"],
                                              first["redis_commands_per_publish"]),
        "lost": sum(r["lost"] or 0 for r in rows),
        "duplicated": sum(r["duplicated"] or 0 for r in rows),
    }


RUNNERS: dict[str, Callable[[Bench, dict[str, Any], int, str], dict[str, Any]]] = {
    "cluster": sc_cluster,
    "workers": sc_workers,
    "redis_rtt": sc_redis_rtt,
}
