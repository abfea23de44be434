"""The dev/test database tooling against real servers: migrations, demo data, embedded PostgreSQL, Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2
import redis.asyncio

from realtime_service.db import migrate
from realtime_service.db.demo import seed_demo
from realtime_service.db.embedded import EmbeddedPostgres, resolve_account
from realtime_service.db.migrate import apply_migrations, migration_files
from tests.conftest import PgServer


def _query(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    """Run one read-only statement and return every row."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement)
            return list(cur.fetchall())
    finally:
        conn.close()


def _schema_snapshot(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a migration could change: columns, constraints, indexes and the ledger."""
    return {
        "columns": _query(dsn, """
            SELECT table_name, column_name, data_type, is_nullable, column_default
            FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"""),
        "constraints": _query(dsn, """
            SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
            FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"""),
        "indexes": _query(dsn, "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"),
        "ledger": _query(dsn, "SELECT name, applied_at FROM schema_migrations ORDER BY name"),
    }


def test_migrate_creates_schema_and_second_run_changes_nothing(pg_server: PgServer) -> None:
    dsn = pg_server.create_database("migrate_fresh", migrated=False)

    applied = apply_migrations(dsn)
    before = _schema_snapshot(dsn)
    again = apply_migrations(dsn)

    assert applied == [path.name for path in migration_files()]
    assert "0001_initial.sql" in applied
    assert again == []
    assert _schema_snapshot(dsn) == before
    columns = {(table, column): (kind, nullable) for table, column, kind, nullable, _ in before["columns"]}
    assert columns[("users", "id")] == ("bigint", "NO")
    assert columns[("diagnoses", "id")] == ("bigint", "NO")
    assert columns[("diagnoses", "user_id")] == ("bigint", "NO")
    assert any("REFERENCES users(id)" in definition for _, _, definition in before["constraints"])
    assert any("(user_id)" in definition for table, definition in before["indexes"] if table == "diagnoses")


def test_plain_inserts_satisfy_the_schema(pg_dsn: str) -> None:
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO users (id) VALUES (9001)")
            cur.execute("INSERT INTO diagnoses (id, user_id) VALUES (9101, 9001)")
            cur.execute("SELECT user_id FROM diagnoses WHERE id = %(diagnosis_id)s", {"diagnosis_id": 9101})
            assert cur.fetchone() == (9001,)
            conn.rollback()
    finally:
        conn.close()


def test_migrate_works_from_another_working_directory(pg_server: PgServer) -> None:
    dsn = pg_server.create_database("migrate_cwd", migrated=False)
    source_root = str(Path(migrate.__file__).resolve().parents[2])
    python_path = os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    script = "import sys; from realtime_service.db.migrate import apply_migrations as m; print(m(sys.argv[1]))"

    result = subprocess.run([sys.executable, "-c", script, dsn], cwd="/tmp", env=env,
                            capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    assert "0001_initial.sql" in result.stdout
    assert apply_migrations(dsn) == []


def test_concurrent_migrations_apply_each_file_once(pg_server: PgServer) -> None:
    dsn = pg_server.create_database("migrate_race", migrated=False)
    start = threading.Barrier(4)

    def migrate() -> list[str]:
        start.wait(timeout=30)
        return apply_migrations(dsn)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [future.result(timeout=60) for future in [pool.submit(migrate) for _ in range(4)]]

    assert sorted(name for applied in results for name in applied) == [p.name for p in migration_files()]
    assert _query(dsn, "SELECT count(*) FROM schema_migrations") == [(len(migration_files()),)]


def test_seed_demo_is_idempotent(pg_server: PgServer) -> None:
    dsn = pg_server.create_database("demo_seed")

    first = seed_demo(dsn)
    rows = _query(dsn, "SELECT id, user_id, title, created_at FROM diagnoses ORDER BY id")
    second = seed_demo(dsn)

    assert first == second
    assert dict(first.owner_of) == {123: 456, 124: 456, 125: 457}
    assert first.diagnoses_of(456) == (123, 124)
    assert set(first.user_ids) == {456, 457}
    assert _query(dsn, "SELECT id, user_id, title, created_at FROM diagnoses ORDER BY id") == rows
    assert _query(dsn, "SELECT count(*) FROM users") == [(2,)]


async def test_redis_fixture_answers_ping(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


def test_session_postgres_listens_on_loopback_tcp(pg_server: PgServer) -> None:
    rows = _query(pg_server.dsn, "SELECT inet_server_addr() IS NOT NULL, pg_backend_pid()")

    assert rows[0][0], "connected over a unix socket, not TCP"
    if not os.environ.get("REALTIME_TEST_DATABASE_URL"):  # embedded: the backend is a local process
        status = Path(f"/proc/{rows[0][1]}/status").read_text()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        assert uid == resolve_account("realtime-pg").uid != 0


def test_embedded_postgres_keeps_data_across_restarts_even_from_a_private_folder(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # as root, unreachable by the server's account: a fallback folder is used
    server = EmbeddedPostgres(private / "pgdata", durable=False)
    try:
        with server:
            _query(server.dsn, "CREATE TABLE kept (x int); SELECT 1")
        assert not server.running
        with server:
            assert _query(server.dsn, "SELECT to_regclass('kept')::text") == [("kept",)]
            assert server.dsn.startswith("postgresql://postgres@127.0.0.1:")
        if os.geteuid() == 0:
            assert not server.data_dir.is_relative_to(private)
            assert server.data_dir.stat().st_uid == resolve_account("realtime-pg").uid
        else:
            assert server.data_dir == (private / "pgdata").resolve()
    finally:
        server.stop()
        if os.geteuid() == 0:
            shutil.rmtree(server.data_dir, ignore_errors=True)  # the fallback lives outside tmp_path
