"""Session-wide real back-ends for the tests: a PostgreSQL (embedded unless given) and a private Redis."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from realtime_service.db.embedded import EmbeddedPostgres
from realtime_service.db.embedded import free_port as _free_port
from realtime_service.db.migrate import apply_migrations

pytest_plugins = ["tests.fixtures_app", "tests.edge_support"]

_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now, for servers the tests start."""
    return _free_port("127.0.0.1")


def database_dsn(dsn: str, name: str) -> str:
    """The same server and credentials as ``dsn``, pointed at database ``name``."""
    parts = urlsplit(dsn)
    if parts.scheme in ("postgresql", "postgres"):
        return urlunsplit(parts._replace(path=f"/{name}"))
    return str(make_dsn(dsn, dbname=name))  # key=value form


class PgServer:
    """A PostgreSQL server on which each test module can get its own fresh, migrated database."""

    def __init__(self, dsn: str) -> None:
        """Wrap the admin (superuser) DSN of a running server."""
        self.dsn = dsn
        # Per-session suffix: two runs sharing an external server never drop each other's databases.
        self._suffix = uuid.uuid4().hex[:8]
        self._created: list[str] = []

    def create_database(self, name: str, *, migrated: bool = True) -> str:
        """Create a fresh database (replacing one of the same name this session) and return its DSN."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        full_name = f"{name}_{self._suffix}"
        self._drop(full_name)
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(full_name)))
        self._created.append(full_name)
        dsn = database_dsn(self.dsn, full_name)
        if migrated:
            apply_migrations(dsn)
        return dsn

    def drop_created(self) -> None:
        """Drop every database this session created (matters on an external server)."""
        while self._created:
            self._drop(self._created.pop())

    def _drop(self, full_name: str) -> None:
        """Drop a database even if a test left connections open to it."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(full_name)))

    def _admin(self, statement: sql.Composed) -> None:
        """Run one statement outside a transaction, as CREATE/DROP DATABASE require."""
        conn = psycopg2.connect(self.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A real PostgreSQL: ``REALTIME_TEST_DATABASE_URL`` if set, else an embedded one in a temp folder."""
    external = os.environ.get("REALTIME_TEST_DATABASE_URL")
    if external:
        server = PgServer(external)
        try:
            yield server
        finally:
            server.drop_created()
        return
    workdir = Path(tempfile.mkdtemp(prefix="realtime-test-pg-"))
    workdir.chmod(0o755)  # as root, the server's system user must reach the data folder inside
    try:
        embedded = EmbeddedPostgres(workdir / "pgdata", durable=False, settings={"max_connections": "200"})
        with embedded:
            yield PgServer(embedded.dsn)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PgServer) -> str:
    """DSN of one migrated database shared by the whole session."""
    return pg_server.create_database("realtime_test")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``REALTIME_TEST_REDIS_URL`` if set, else a private redis-server without persistence."""
    external = os.environ.get("REALTIME_TEST_REDIS_URL")
    if external:
        yield external
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: run `bash tests/run.sh`, which installs it, "
                    "or set REALTIME_TEST_REDIS_URL", pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="realtime-test-redis-"))
    port = free_port()
    log_path = workdir / "redis.log"
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--daemonize", "no", "--logfile", str(log_path)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_for_redis(process, port, log_path)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_redis(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Block until the server answers PING, failing the session with its log if it dies or hangs."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    pytest.fail(f"redis-server on port {port} did not start (exit code {process.poll()}):\n{log}", pytrace=False)
