"""Issue 9, findings 1 and 2: every fault of the read replica answers 503 / 1013 ownership_unavailable in bounded
time, under asyncio's loop and under uvloop, never a 500 / 1011 and never silence; open connections are not
affected; the service recovers within seconds of the replica's return.

Faults, each on a PostgreSQL of this module's own: nothing listening, stopped, killed (SIGKILL), refusing new
sessions, slower than the statement timeout, the server cancelling the statement, and restarted under load.
Each test runs its own event loop (asyncio or uvloop) and builds the app as tests/fixtures_app.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2
import pytest
import uvloop
from aiohttp.test_utils import TestServer

from realtime_service.auth.replica import RETRY_AFTER, _Connection
from realtime_service.db.embedded import EmbeddedPostgres
from realtime_service.db.migrate import apply_migrations
from realtime_service.web.app import create_app
from realtime_service.web.state import STATE
from tests.conftest import database_dsn, free_port
from tests.fixtures_app import Service, make_settings
from tests.support import Client, Seeder, Tokens

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
loops = pytest.mark.parametrize("loop_name", list(LOOPS))

TIMEOUTS = {"db_connect_timeout": 1, "db_statement_timeout": 0.5, "ownership_cache_ttl": 0}
BOUND = 1 + 0.5 + 1.0  # connect + statement timeouts, and a second for the rest
RECOVERY = 5.0  # seconds after the replica's return by which connections are accepted again

SLOW_OWNER = """
CREATE TABLE replica_mood (seconds float NOT NULL DEFAULT 0, cancel boolean NOT NULL DEFAULT false);
INSERT INTO replica_mood DEFAULT VALUES;
CREATE FUNCTION owner_of(did bigint) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF (SELECT cancel FROM replica_mood) THEN
        RAISE EXCEPTION 'canceling statement due to statement timeout' USING ERRCODE = 'query_canceled';
    END IF;
    PERFORM pg_sleep((SELECT seconds FROM replica_mood));
    RETURN (SELECT user_id FROM diagnoses WHERE id = did);
END $$;
"""
MOODY_QUERY = "SELECT owner_of(%(diagnosis_id)s)"


def run_on(loop_name: str, main: Callable[[], Awaitable[None]], timeout: float = 90) -> None:
    """Run `main` on a fresh loop of that kind, checking it is that kind."""
    async def checked() -> None:
        running = asyncio.get_running_loop()
        assert isinstance(running, uvloop.Loop) == (loop_name == "uvloop"), type(running)
        await asyncio.wait_for(main(), timeout)

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(checked())


@contextlib.asynccontextmanager
async def service_on(dsn: str, **overrides: Any) -> AsyncIterator[Service]:
    """The real app on a loopback port, on the running loop."""
    app = create_app(make_settings(dsn, **{**TIMEOUTS, **overrides}))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    service = Service(server, app, app[STATE].settings, aiohttp.ClientSession(), Tokens(), Seeder(dsn))
    try:
        yield service
    finally:
        await service.http.close()
        await server.close()


# -- the replica and what can happen to it ----------------------------------------------------------------------

@dataclass
class Replica:
    """A PostgreSQL of this module's own; the service reads database `replica` on it."""

    server: EmbeddedPostgres
    admin: str  # the `postgres` database, for the test's own statements
    dsn: str
    user_id: int
    diagnosis_id: int

    def execute(self, sql: str, *, admin: bool = False) -> None:
        conn = psycopg2.connect(self.admin if admin else self.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)

    async def start(self) -> None:
        if not self.server.running:
            assert await asyncio.to_thread(self.server.start) == self.admin, "restarted on another port"

    async def kill(self) -> None:
        """SIGKILL the postmaster and every backend, as the OOM killer or a crashed host would."""
        text = (self.server.data_dir / "postmaster.pid").read_text()
        postmaster = int(text.splitlines()[0])
        pids = [postmaster, *children_of(postmaster)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "the replica's processes did not die"
            await asyncio.sleep(0.05)
        # A killed postmaster leaves its lock file; pg_ctl would wait for it to go. Take it away, as an operator
        # restarting a crashed server does once every process of it is gone.
        (self.server.data_dir / "postmaster.pid").unlink(missing_ok=True)
        await self.stop()  # forget the dead server (nothing to stop), so start() starts it again

    async def refuse(self, refusing: bool) -> None:
        """The server stays up but takes no new session on the database; the open ones are ended."""
        def change() -> None:
            self.execute(f"ALTER DATABASE replica WITH ALLOW_CONNECTIONS {'false' if refusing else 'true'}",
                         admin=True)
            if refusing:
                self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'replica'",
                             admin=True)
        await asyncio.to_thread(change)

    async def mood(self, seconds: float = 0, cancel: bool = False) -> None:
        await asyncio.to_thread(self.execute, f"UPDATE replica_mood SET seconds = {seconds}, cancel = {cancel}")


def children_of(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == parent:
                    out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def replica_server() -> Iterator[Replica]:
    workdir = Path(tempfile.mkdtemp(prefix="realtime-test-faults-"))
    workdir.chmod(0o755)  # as root, the server's system user must reach the data folder inside
    # synchronous_commit: a SIGKILL must not take the last commits with it (the test kills the server)
    server = EmbeddedPostgres(workdir / "pgdata", port=free_port(), durable=False,
                              settings={"synchronous_commit": "on"})
    try:
        admin = server.start()
        conn = psycopg2.connect(admin)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE replica")
        conn.close()
        dsn = database_dsn(admin, "replica")
        apply_migrations(dsn)
        replica = Replica(server, admin, dsn, 0, 0)
        replica.execute(SLOW_OWNER)
        replica.user_id, replica.diagnosis_id = Seeder(dsn).owned()
        yield replica
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def replica(replica_server: Replica) -> Iterator[Replica]:
    """Running, accepting sessions and quick before and after each test, whatever the test did to it."""
    def healthy() -> None:
        if not replica_server.server.running:
            replica_server.server.start()
        replica_server.execute("ALTER DATABASE replica WITH ALLOW_CONNECTIONS true", admin=True)
        replica_server.execute("UPDATE replica_mood SET seconds = 0, cancel = false")

    healthy()
    yield replica_server
    healthy()


# -- what a client sees -----------------------------------------------------------------------------------------

async def attempt(service: Service, did: int, token: str) -> tuple[str, float]:
    """A WebSocket connect: ("connect" | "<code> <reason>", seconds until the answer)."""
    started = time.monotonic()
    client = await service.open(did, token, "header")
    try:
        await client.wait(lambda c: c.frames or c.closed, "a first frame or a close", BOUND + 10)
    except AssertionError:
        return "no answer", time.monotonic() - started
    elapsed = time.monotonic() - started
    if client.frames and client.frames[0]["type"] == "connect":
        await client.close()
        return "connect", elapsed
    return f"{client.close_code} {client.close_reason}", elapsed


async def publish(service: Service, did: int) -> tuple[int, float]:
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {service.tokens.service()}"}
    async with service.http.post(f"{service.base_url}/api/v1/publish", headers=headers,
                                 json={"diagnosis_id": did, "type": "fault_test", "data": {}}) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


async def readyz(service: Service) -> tuple[int, float]:
    started = time.monotonic()
    async with service.http.get(f"{service.base_url}/readyz") as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


async def unavailable_count(service: Service) -> float:
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        text = await resp.text()
    match = re.search(r'^realtime_ownership_query_seconds_count\{result="unavailable"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def assert_unavailable(service: Service, replica: Replica, tries: int = 3, replica_down: bool = True) -> None:
    """WebSocket 1013 ownership_unavailable, publish 503, each within BOUND and counted as unavailable; /readyz 503
    when the replica is down (a replica that answers `SELECT 1` but not the ownership query is up for /readyz)."""
    token = service.tokens.user(replica.user_id)
    before = await unavailable_count(service)
    for _ in range(tries):
        outcome, seconds = await attempt(service, replica.diagnosis_id, token)
        assert outcome == "1013 ownership_unavailable", outcome
        assert seconds <= BOUND, f"refused after {seconds:.2f}s"
        status, seconds = await publish(service, replica.diagnosis_id)
        assert status == 503 and seconds <= BOUND, (status, seconds)
        status, seconds = await readyz(service)
        assert status == (503 if replica_down else 200) and seconds <= BOUND + 3, (status, seconds)
    assert await unavailable_count(service) >= before + 2 * tries
    async with service.http.get(f"{service.base_url}/healthz") as resp:
        assert resp.status == 200


async def assert_recovers(service: Service, replica: Replica, since: float) -> None:
    """Accepted again within RECOVERY seconds of `since` (the replica's return), publish and readyz too."""
    token = service.tokens.user(replica.user_id)
    while True:
        outcome, _ = await attempt(service, replica.diagnosis_id, token)
        if outcome == "connect":
            break
        assert outcome == "1013 ownership_unavailable", outcome
        assert time.monotonic() - since < RECOVERY, f"not accepted {RECOVERY}s after the replica returned"
        await asyncio.sleep(0.1)
    assert (await publish(service, replica.diagnosis_id))[0] == 200
    assert (await readyz(service))[0] == 200


async def assert_alive(client: Client) -> None:
    """An open connection still answers and is still open."""
    await client.send({"type": "ping"})
    await client.next_of("pong", timeout=5)
    assert not client.closed


# -- the faults -------------------------------------------------------------------------------------------------

@loops
def test_nothing_listening_20_tries_each_are_503_and_1013(loop_name: str, pg_dsn: str) -> None:
    """Finding 1 as reported: 20 tries each of /readyz, a publish and a connect; before, about half were 500/1011."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/replica"

    async def main() -> None:
        async with service_on(dead) as service:
            token = service.tokens.user(1)
            for i in range(20):
                await asyncio.sleep(0.6 if i % 4 == 0 else 0)  # past the fail-fast window now and then
                status, seconds = await readyz(service)
                assert status == 503 and seconds <= BOUND + 3, (i, status, seconds)
                status, seconds = await publish(service, 1)
                assert status == 503 and seconds <= BOUND, (i, status, seconds)
                outcome, seconds = await attempt(service, 1, token)
                assert outcome == "1013 ownership_unavailable" and seconds <= BOUND, (i, outcome, seconds)
            assert await unavailable_count(service) >= 40

    run_on(loop_name, main)


@loops
def test_a_failed_connect_leaves_the_loop_clean_for_the_next_socket(loop_name: str) -> None:
    """The root of finding 1: after aiopg's failed connect, uvloop kept a closed poll handle on the descriptor, and
    whoever got that number next (a replica connection, or an HTTP client's socket) failed in add_reader/add_writer.
    Checked right after the failure, before anything else could clean up."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/replica"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(6):
            conn = _Connection(dead, 1, enable_json=False, enable_hstore=False, enable_uuid=False)
            with pytest.raises(psycopg2.OperationalError):
                await conn
            with socket.socket() as sock:  # gets the lowest free number: the one libpq just closed
                sock.setblocking(False)
                loop.add_writer(sock.fileno(), lambda: None)
                loop.add_reader(sock.fileno(), lambda: None)
                loop.remove_writer(sock.fileno())
                loop.remove_reader(sock.fileno())
            conn.close()
            await asyncio.sleep(RETRY_AFTER / 10)

    run_on(loop_name, main)


@loops
def test_replica_stopped(loop_name: str, replica: Replica) -> None:
    async def main() -> None:
        async with service_on(replica.dsn) as service:
            live = await service.connect(replica.diagnosis_id, service.tokens.user(replica.user_id))
            await replica.stop()
            await assert_unavailable(service, replica)
            await assert_alive(live)
            await replica.start()
            await assert_recovers(service, replica, time.monotonic())
            await assert_alive(live)
            await live.close()

    run_on(loop_name, main)


@loops
def test_replica_killed(loop_name: str, replica: Replica) -> None:
    async def main() -> None:
        async with service_on(replica.dsn) as service:
            live = await service.connect(replica.diagnosis_id, service.tokens.user(replica.user_id))
            await replica.kill()
            await assert_unavailable(service, replica)
            await assert_alive(live)
            await replica.start()
            await assert_recovers(service, replica, time.monotonic())
            await assert_alive(live)
            await live.close()

    run_on(loop_name, main)


@loops
def test_replica_refusing_new_sessions(loop_name: str, replica: Replica) -> None:
    async def main() -> None:
        async with service_on(replica.dsn) as service:
            live = await service.connect(replica.diagnosis_id, service.tokens.user(replica.user_id))
            await replica.refuse(True)
            await assert_unavailable(service, replica)
            await assert_alive(live)
            await replica.refuse(False)
            await assert_recovers(service, replica, time.monotonic())
            await live.close()

    run_on(loop_name, main)


@loops
def test_replica_slower_than_the_statement_timeout(loop_name: str, replica: Replica) -> None:
    """Finding 2: 50 connects and a publish while the ownership query takes 5 s against a 0.5 s statement timeout."""
    async def main() -> None:
        async with service_on(replica.dsn, ownership_query=MOODY_QUERY) as service:
            token = service.tokens.user(replica.user_id)
            live = await service.connect(replica.diagnosis_id, token)
            await replica.mood(seconds=5)
            before = await unavailable_count(service)
            started = time.monotonic()
            results = await asyncio.gather(*(attempt(service, replica.diagnosis_id, token) for _ in range(50)),
                                           publish(service, replica.diagnosis_id))
            assert {outcome for outcome, _ in results[:-1]} == {"1013 ownership_unavailable"}, results
            assert results[-1][0] == 503, results[-1]
            assert time.monotonic() - started <= BOUND + 1, "the storm was not answered in bounded time"
            assert await unavailable_count(service) > before
            await assert_unavailable(service, replica, tries=1, replica_down=False)
            await assert_alive(live)
            await replica.mood(seconds=0)
            await assert_recovers(service, replica, time.monotonic())
            await live.close()

    run_on(loop_name, main)


@loops
def test_the_server_cancelling_the_statement(loop_name: str, replica: Replica) -> None:
    """QueryCanceledError (what the server's statement_timeout raises), which aiopg turns into CancelledError."""
    async def main() -> None:
        async with service_on(replica.dsn, ownership_query=MOODY_QUERY) as service:
            token = service.tokens.user(replica.user_id)
            live = await service.connect(replica.diagnosis_id, token)
            await replica.mood(cancel=True)
            loop = asyncio.get_running_loop()
            reported: list[dict[str, Any]] = []
            loop.set_exception_handler(lambda _loop, context: reported.append(context))  # aiopg reports it here
            await assert_unavailable(service, replica, replica_down=False)
            assert any("canceling statement" in str(c.get("message")) for c in reported), \
                "the server did not cancel the statement: this test did not test what it says"
            await assert_alive(live)
            await replica.mood(cancel=False)
            await assert_recovers(service, replica, time.monotonic())
            await live.close()

    run_on(loop_name, main)


@loops
def test_replica_restarted_under_load(loop_name: str, replica: Replica) -> None:
    """Connects and publishes keep coming while the replica restarts: every answer is a success or 503/1013, in
    bounded time; the open connections keep receiving; successes resume within seconds of the return."""
    async def main() -> None:
        async with service_on(replica.dsn) as service:
            token = service.tokens.user(replica.user_id)
            lives = [await service.connect(replica.diagnosis_id, token, device=f"live{i}") for i in range(3)]
            outcomes: list[tuple[float, str, float]] = []
            stop = asyncio.Event()

            async def connector() -> None:
                for _ in range(1000):  # bounded in count, and by `stop` in time
                    if stop.is_set():
                        return
                    outcome, seconds = await attempt(service, replica.diagnosis_id, token)
                    outcomes.append((time.monotonic(), outcome, seconds))
                    await asyncio.sleep(0.05)

            async def publisher() -> None:
                for _ in range(1000):
                    if stop.is_set():
                        return
                    status, seconds = await publish(service, replica.diagnosis_id)
                    outcomes.append((time.monotonic(), str(status), seconds))
                    await asyncio.sleep(0.05)

            workers = [asyncio.create_task(w()) for w in (connector, connector, connector, publisher)]
            await asyncio.sleep(0.5)
            await replica.stop()
            await asyncio.sleep(1.0)
            await replica.start()
            returned = time.monotonic()
            await asyncio.sleep(RECOVERY)
            stop.set()
            await asyncio.gather(*workers)

            assert {o for _, o, _ in outcomes} <= {"connect", "1013 ownership_unavailable", "200", "503"}, \
                sorted({o for _, o, _ in outcomes})
            assert max(s for _, _, s in outcomes) <= BOUND, "an answer took longer than the timeouts allow"
            assert any(o in ("1013 ownership_unavailable", "503") for _, o, _ in outcomes), "the outage was unseen"
            late = [o for t, o, _ in outcomes if t > returned + RECOVERY - 2]
            assert late and set(late) <= {"connect", "200"}, f"still failing after the return: {late[-5:]}"
            for live in lives:
                await assert_alive(live)
                assert live.of_type("fault_test"), "an open connection stopped receiving"
                await live.close()

    run_on(loop_name, main, timeout=120)
