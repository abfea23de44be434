"""`realtime-service serve --workers 2` (PROTOCOL 5.4), run the way an operator runs it: a real subprocess on a
real Redis and the test PostgreSQL, reached over loopback.

Which worker holds a connection is read from the kernel (/proc: the process owning each accepted socket), not
from anything the service says about itself. Worker pids come from the supervisor's log lines.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import Gauge

from realtime_service.metrics import Metrics
from realtime_service.supervisor import RESTART_FIRST_DELAY, RESTART_MAX_DELAY, restart_delay
from tests.support import Client, Seeder, Tokens
from tests.test_metrics import Scrape
from tests.test_settings_cli import ServerProcess, cli_path, run_cli, serve_env

SECRET = "workers-secret-" + "w" * 32
START = 60.0  # two interpreters, two apps, two pools on a busy 2-core machine


@pytest.fixture
async def servers() -> AsyncIterator[list[ServerProcess]]:
    """Servers a test starts; any still running afterwards are killed (their workers then drain and exit)."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.kill()


def workers_env(pg_dsn: str, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A serve environment with its own Redis key prefix and its own temp folder (to see what is left there)."""
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    return serve_env(pg_dsn, SECRET, REALTIME_REDIS_URL=redis_url,
                     REALTIME_REDIS_PREFIX=f"tw{uuid.uuid4().hex[:8]}", TMPDIR=str(temp), **extra)


async def start_workers(env: dict[str, str], tmp_path: Path, servers: list[ServerProcess]) -> ServerProcess:
    """`serve --workers 2 --port 0`; the port is read from the one "listening" line."""
    proc = await asyncio.create_subprocess_exec(
        cli_path(), "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2", env=env, cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(proc, 0)
    servers.append(server)
    await server.wait_for(lambda text: "listening on" in text, "the supervisor to listen", timeout=START)
    listening = [line for line in log_lines(server) if line["message"].startswith("listening on")]
    assert len(listening) == 1, listening  # once, by the parent, not once per worker
    assert listening[0]["workers"] == 2
    server.port = listening[0]["port"]
    assert server.port != 0
    return server


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for raw in server.text.splitlines():
        if raw.startswith("{"):
            out.append(json.loads(raw))
    return out


def supervisor_said(server: ServerProcess, message: str) -> bool:
    return any(line.get("logger") == "realtime.supervisor" and line["message"] == message
               for line in log_lines(server))


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker number -> pid of its current process, from the supervisor's `ready` lines."""
    pids: dict[int, int] = {}
    for line in log_lines(server):
        if line.get("logger") == "realtime.supervisor" and "ready" in line["message"]:
            pids[line["worker"]] = line["worker_pid"]
    return pids


def accepted_sockets(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to `port` each process holds (its accepted sockets)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
                    inodes.add(fields[9])
    counts: dict[int, int] = {}
    for pid in pids:
        held = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                held += 1
        counts[pid] = held
    return counts


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "gone"


async def fresh_get(url: str) -> tuple[int, str]:
    """One request on a new TCP connection, so the kernel picks a worker for it anew."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http, \
            http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.text()


async def open_clients(http: aiohttp.ClientSession, port: int, did: int, uid: int, tokens: Tokens, count: int
                       ) -> list[Client]:
    clients = []
    for i in range(count):
        ws = await http.ws_connect(f"ws://127.0.0.1:{port}/ws/{did}?device=w{i}",
                                   headers={"Authorization": f"Bearer {tokens.user(uid)}"})
        clients.append(Client(ws).start())
    for client in clients:
        await client.wait(lambda c: c.of_type("connect"), "the connect frame")
    return clients


async def publish(http: aiohttp.ClientSession, port: int, tokens: Tokens, did: int, type_: str,
                  data: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"http://127.0.0.1:{port}/api/v1/publish",
                         json={"diagnosis_id": did, "type": type_, "data": data},
                         headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 200, answer
        return answer


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_connections_land_on_both_workers_a_publish_reaches_all_and_metrics_sum(
        pg_dsn: str, redis_url: str, tmp_path: Path, servers: list[ServerProcess]) -> None:
    tokens, seeder = Tokens(SECRET), Seeder(pg_dsn)
    server = await start_workers(workers_env(pg_dsn, redis_url, tmp_path), tmp_path, servers)
    pids = worker_pids(server)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    uid, did = seeder.owned()
    async with aiohttp.ClientSession() as http:
        clients = await open_clients(http, server.port, did, uid, tokens, 20)
        held = accepted_sockets(server.port, list(pids.values()))
        assert sum(held.values()) == 20, held
        assert all(count > 0 for count in held.values()), f"one worker took every connection: {held}"

        answer = await publish(http, server.port, tokens, did, "across_workers", {"n": 1})
        for client in clients:  # those on the worker that did not take the publish too, through Redis
            frame = await client.next_of("across_workers")
            assert frame["data"] == {"n": 1}
            assert frame["offset"] == answer["offset"]
        assert answer["delivered"] >= min(held.values())  # at least the answering worker's own

        # Every scrape, whichever worker answers it (a new TCP connection each), counts the whole machine.
        for _ in range(6):
            status, text = await fresh_get(f"http://127.0.0.1:{server.port}/metrics")
            assert status == 200
            scrape = Scrape(text)
            assert scrape.value("realtime_connection_attempts_total", outcome="accepted") == 20
            assert scrape.value("realtime_connections") == 20
            assert scrape.value("realtime_publishes_total", kind="broadcast") == 1
            assert scrape.value("realtime_deliveries_total") == 20
            assert scrape.value("realtime_build_info", version="1.0.0") == 1
            assert "pid" not in scrape.label_values() and not any(
                str(pid) in value for pid in pids.values() for value in scrape.label_values())

        # /ws/status and presence count both workers (each is a node of the cluster), whichever answers.
        async def ws_status() -> dict[str, Any]:
            _, body = await fresh_get(f"http://127.0.0.1:{server.port}/ws/status")
            answer: dict[str, Any] = json.loads(body)
            return answer

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await ws_status())["connections"] != 20:  # presence is written a moment after a change
            assert loop.time() < deadline, await ws_status()
            await asyncio.sleep(0.05)
        for _ in range(6):
            assert (await ws_status())["connections"] == 20
            status_code, body = await fresh_get(f"http://127.0.0.1:{server.port}/readyz")
            assert status_code == 200, body
        async with http.get(f"http://127.0.0.1:{server.port}/api/v1/diagnoses/{did}/presence",
                            headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["users"][0]["connections"] == 20

        # SIGHUP (re-read the key files) is passed on to the workers: nobody dies of it, no client is touched.
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_for(lambda _text: supervisor_said(server, "SIGHUP: passing it to 2 worker(s)"),
                              "the supervisor to pass SIGHUP on")
        await publish(http, server.port, tokens, did, "after_sighup", {"n": 2})
        for client in clients:
            await client.next_of("after_sighup")
        assert server.proc.returncode is None and all(alive(pid) for pid in pids.values())
        assert worker_pids(server) == pids
        for client in clients:
            await client.close()


async def test_a_killed_worker_is_restarted_and_logged_while_the_port_keeps_answering(
        pg_dsn: str, redis_url: str, tmp_path: Path, servers: list[ServerProcess]) -> None:
    tokens, seeder = Tokens(SECRET), Seeder(pg_dsn)
    server = await start_workers(workers_env(pg_dsn, redis_url, tmp_path), tmp_path, servers)
    pids = worker_pids(server)
    uid, did = seeder.owned()
    async with aiohttp.ClientSession() as http:
        clients = await open_clients(http, server.port, did, uid, tokens, 20)
        held = accepted_sockets(server.port, list(pids.values()))
        assert all(count > 0 for count in held.values()), held
        victim_number, victim = 1, pids[1]
        survivor = pids[2]
        on_survivor = held[survivor]

        os.kill(victim, signal.SIGKILL)
        await server.wait_for(lambda text: f"(pid {victim}) killed by SIGKILL; restarting" in text,
                              "the supervisor to log the death")
        # The dead worker's listening socket is gone with it: every new connection reaches the live one.
        for _ in range(10):
            status, _ = await fresh_get(f"http://127.0.0.1:{server.port}/healthz")
            assert status == 200
        await server.wait_for(lambda _text: worker_pids(server).get(victim_number, victim) != victim,
                              "the worker to be restarted", timeout=START)
        replacement = worker_pids(server)[victim_number]
        assert alive(replacement) and replacement != victim
        assert not alive(victim)

        # The survivor's clients stayed open; the victim's saw their connection end.
        await wait_until(lambda: sum(c.closed for c in clients) == 20 - on_survivor,
                         "the killed worker's clients to notice")
        still_open = [c for c in clients if not c.closed]
        assert len(still_open) == on_survivor
        await publish(http, server.port, tokens, did, "after_restart", {"n": 2})
        for client in still_open:
            await client.next_of("after_restart")

        # The restarted worker takes connections again.
        more = await open_clients(http, server.port, did, uid, tokens, 20)
        held = accepted_sockets(server.port, [replacement, survivor])
        assert held[replacement] > 0, held

        # The machine's counters keep the dead worker's counts; its open connections no longer count.
        _, text = await fresh_get(f"http://127.0.0.1:{server.port}/metrics")
        scrape = Scrape(text)
        assert scrape.value("realtime_connection_attempts_total", outcome="accepted") == 40
        assert scrape.value("realtime_connections") == on_survivor + 20
        for client in [*still_open, *more]:
            await client.close()
    code, _ = await server.terminate()
    assert code == 0, server.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_drains_every_worker_with_1012_and_exits_0(
        pg_dsn: str, redis_url: str, tmp_path: Path, servers: list[ServerProcess], sig: signal.Signals) -> None:
    tokens, seeder = Tokens(SECRET), Seeder(pg_dsn)
    grace = 8.0
    env = workers_env(pg_dsn, redis_url, tmp_path, REALTIME_DRAIN_PERIOD="1", REALTIME_SHUTDOWN_GRACE=str(grace))
    server = await start_workers(env, tmp_path, servers)
    pids = worker_pids(server)
    metrics_dirs = list((tmp_path / "tmp").glob("realtime-metrics-*"))
    assert len(metrics_dirs) == 1 and any(metrics_dirs[0].iterdir())  # the workers write their values there
    uid, did = seeder.owned()
    async with aiohttp.ClientSession() as http:
        clients = await open_clients(http, server.port, did, uid, tokens, 20)
        held = accepted_sockets(server.port, list(pids.values()))
        assert all(count > 0 for count in held.values()), held
        loop = asyncio.get_running_loop()

        async def closed_at(client: Client) -> float:
            await client.wait_closed(timeout=grace + 5)
            return loop.time()

        watchers = [asyncio.create_task(closed_at(client)) for client in clients]
        started = loop.time()
        server.proc.send_signal(sig)
        code = await asyncio.wait_for(server.proc.wait(), grace + 5)
        elapsed = loop.time() - started
        close_times = await asyncio.gather(*watchers)
        await server.wait_for(lambda _text: supervisor_said(server, "stopped"), "the supervisor's last line")
    assert code == 0, server.text
    assert elapsed < grace, f"exit took {elapsed:.2f}s, grace is {grace}s"
    for client in clients:
        assert (client.close_code, client.close_reason) == (1012, "service_restart")
    assert max(close_times) - min(close_times) >= 0.2, "closes were not spread over the drain period"
    assert not any(alive(pid) for pid in pids.values())
    drained = [line for line in log_lines(server) if line["message"].startswith("draining ")]
    assert sorted(line["worker"] for line in drained) == [1, 2]  # each worker ran its own drain
    exits = {line["message"] for line in log_lines(server) if line.get("logger") == "realtime.supervisor"}
    for number, pid in pids.items():
        assert f"worker {number} (pid {pid}) exited with code 0" in exits, server.text  # a clean exit each
    assert not metrics_dirs[0].exists()  # the parent removed the metrics folder


async def test_a_worker_that_does_not_stop_is_killed_at_the_end_of_the_grace_period(
        pg_dsn: str, redis_url: str, tmp_path: Path, servers: list[ServerProcess]) -> None:
    grace = 3.0
    env = workers_env(pg_dsn, redis_url, tmp_path, REALTIME_DRAIN_PERIOD="0.2", REALTIME_SHUTDOWN_GRACE=str(grace))
    server = await start_workers(env, tmp_path, servers)
    pids = worker_pids(server)
    os.kill(pids[1], signal.SIGSTOP)  # hung: it cannot act on SIGTERM
    code, elapsed = await server.terminate(timeout=grace + 5)
    assert code == 0, server.text
    assert elapsed < grace + 0.5, f"exit took {elapsed:.2f}s, grace is {grace}s"
    assert "still running after the grace period: killing them" in server.text
    assert f"worker 1 (pid {pids[1]}) killed by SIGKILL" in server.text
    assert f"worker 2 (pid {pids[2]}) exited with code 0" in server.text
    assert not any(alive(pid) for pid in pids.values())


async def test_workers_leave_when_the_supervisor_is_killed(
        pg_dsn: str, redis_url: str, tmp_path: Path, servers: list[ServerProcess]) -> None:
    env = workers_env(pg_dsn, redis_url, tmp_path, REALTIME_DRAIN_PERIOD="0.2", REALTIME_SHUTDOWN_GRACE="5")
    server = await start_workers(env, tmp_path, servers)
    pids = list(worker_pids(server).values())
    server.proc.kill()  # SIGKILL: no chance to stop them
    await server.proc.wait()
    await wait_until(lambda: not any(alive(pid) for pid in pids), "the orphaned workers to exit", timeout=10)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_more_than_one_worker_without_redis_is_refused_in_one_line(pg_dsn: str, tmp_path: Path, how: str) -> None:
    env = serve_env(pg_dsn, SECRET, **({"REALTIME_WORKERS": "2"} if how == "env" else {}))
    args = ["serve", "--host", "127.0.0.1", "--port", "0", *(["--workers", "2"] if how == "flag" else [])]
    result = run_cli(*args, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "REALTIME_REDIS_URL" in lines[0]
    assert ("--workers" if how == "flag" else "REALTIME_WORKERS") in lines[0]
    assert "Traceback" not in result.stderr


def test_a_worker_that_cannot_start_stops_the_start_with_its_one_line(pg_dsn: str, tmp_path: Path) -> None:
    env = workers_env(pg_dsn, "ftp://127.0.0.1:1/0", tmp_path)  # today each worker refuses it
    result = run_cli("serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("realtime-service serve:")]
    assert len(said) == 1, result.stderr  # once, not once per worker
    assert "REALTIME_REDIS_URL" in said[0]
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr
    assert not list((tmp_path / "tmp").glob("realtime-metrics-*"))


def test_a_crash_loop_backs_off_and_a_healthy_run_restarts_quickly() -> None:
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == RESTART_FIRST_DELAY
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))
    assert delays[3] == 8 * RESTART_FIRST_DELAY
    assert max(delays) == RESTART_MAX_DELAY == restart_delay(10_000)


def test_every_gauge_sums_over_workers_without_a_pid_label() -> None:
    """In multiprocess mode a gauge left at prometheus-client's default ("all") gets a pid label per worker."""
    gauges = [value for value in vars(Metrics()).values() if isinstance(value, Gauge)]
    assert len(gauges) >= 3
    for gauge in gauges:
        assert gauge._multiprocess_mode not in ("all", "liveall"), gauge._name


def test_workers_must_be_a_positive_count(pg_dsn: str, tmp_path: Path) -> None:
    result = run_cli("serve", "--port", "0", "--workers", "0", env=serve_env(pg_dsn, SECRET), cwd=tmp_path)
    assert result.returncode == 2
    assert "workers" in result.stderr and "Traceback" not in result.stderr
