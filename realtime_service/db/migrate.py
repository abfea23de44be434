"""Applies the SQL files in ``migrations/`` once each, so ``realtime-service migrate`` is safe to repeat."""

from __future__ import annotations

import logging
import site
import sys
import sysconfig
from pathlib import Path

import psycopg2

_log = logging.getLogger(__name__)

# Arbitrary constant shared by every node: whoever holds it is the only one migrating.
_LOCK_KEY = 0x7265616C74696D65  # "realtime"

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text        PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def migrations_dir() -> Path:
    """Find the shipped SQL files from any working directory: source checkout first, then installed data."""
    checkout = Path(__file__).resolve().parents[2]
    candidates: list[Path] = []
    # Only trust <parent>/migrations in a source tree; site-packages may hold another project's folder.
    if (checkout / "setup.cfg").is_file() or (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / "migrations")
    data_roots = [Path(sys.prefix), Path(sysconfig.get_path("data"))]
    if site.ENABLE_USER_SITE:  # `pip install --user` puts data files under the user base
        data_roots.append(Path(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user"))))
    for root in data_roots:
        candidate = root / "share" / "realtime-service" / "migrations"
        if candidate not in candidates:
            candidates.append(candidate)
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no migrations/*.sql found; looked in {searched}")


def migration_files(directory: Path | None = None) -> list[Path]:
    """List the migrations in the order they must run: by file name."""
    folder = migrations_dir() if directory is None else directory
    return sorted(folder.glob("*.sql"), key=lambda path: path.name)


def apply_migrations(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply each pending migration in its own transaction with its ledger row; return names applied now."""
    files = migration_files(directory)
    applied: list[str] = []
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            # The lock serialises concurrent CREATE TABLE IF NOT EXISTS, which can otherwise race.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            row = cur.fetchone()
            if row is None or not row[0]:
                cur.execute(_CREATE_LEDGER)
        for path in files:
            with conn, conn.cursor() as cur:
                # Re-checked under the lock, so two nodes migrating at once apply each file once.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                cur.execute("SELECT 1 FROM schema_migrations WHERE name = %s", (path.name,))
                if cur.fetchone() is not None:
                    continue
                _log.info("applying migration %s", path.name)
                cur.execute(path.read_text(encoding="utf-8"))
                cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
    finally:
        conn.close()
    return applied

