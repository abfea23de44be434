"""Checks run once when `serve` or `dev` starts, so that a mistake is one line at start, not a 1011 per connect.

Settings validation (settings.py) sees values; these checks look at what the values point to: the files a
setting names, the strength of an HMAC secret in production, and the ownership query, run once against the
replica. Each refusal names the setting and where its value came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import psycopg2

from realtime_service.db.describe import describe_db_error, mask_dsn, server_of
from realtime_service.settings import ConfigError, Loaded, Settings

log = logging.getLogger("realtime.preflight")

# RFC 7518 3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
SECRET_SETTINGS = ("jwt_secret", "jwt_previous_secret")
# PostgreSQL type OIDs an owner id may come back as: int2, int4, int8, oid.
INTEGER_TYPES = frozenset({20, 21, 23, 26})


def file_settings() -> list[str]:
    """Every setting that names a file: typed as a path, or called `*_file`."""
    names = []
    for name, info in Settings.model_fields.items():
        if name.endswith("_file") or Path in (info.annotation, *get_args(info.annotation)):
            names.append(name)
    return names


def check_files(loaded: Loaded) -> None:
    """Each file a setting names exists and can be read (a container without the mount fails here, named)."""
    problems = []
    for name in file_settings():
        value = getattr(loaded.settings, name)
        if value is None or value == "":
            continue
        path = Path(value)
        try:
            with path.open("rb"):
                pass
        except IsADirectoryError:
            problems.append(f"{name} ({loaded.where(name)}) names {path}, which is a folder, not a file")
        except FileNotFoundError:
            problems.append(f"{name} ({loaded.where(name)}) names {path}, which does not exist (in a container, "
                            "mount it there)")
        except OSError as exc:
            problems.append(f"{name} ({loaded.where(name)}) names {path}, which cannot be read: "
                            f"{exc.strerror or exc}")
    if problems:
        raise ConfigError("; ".join(problems))


def check_secrets(loaded: Loaded) -> None:
    """In production an HMAC secret is at least as long as its hash (32 bytes for HS256)."""
    settings = loaded.settings
    if settings.development:
        return
    needed = max((HMAC_MIN_BYTES.get(alg, 0) for alg in settings.jwt_algorithms), default=0)
    if not needed:
        return
    for name in SECRET_SETTINGS:
        value = getattr(settings, name, None)
        if value is None:
            continue
        size = len(value.get_secret_value().encode())
        if size < needed:
            algs = "/".join(a for a in settings.jwt_algorithms if a in HMAC_MIN_BYTES)
            raise ConfigError(
                f"{name} ({loaded.where(name)}) is {size} bytes; {algs} in production needs at least {needed} "
                f"(RFC 7518). Make one with: python3 -c 'import secrets; print(secrets.token_urlsafe({needed}))'")


@dataclass(frozen=True)
class ReplicaReport:
    """What the start-up probe of the replica found: reachable or not, and why not."""

    reachable: bool
    detail: str


def check_replica(loaded: Loaded) -> ReplicaReport:
    """Run the ownership query once (read-only, diagnosis 0) to catch a query that can never answer.

    An unreachable replica is not a reason to refuse to start (the service recovers by itself, /readyz says
    503 meanwhile); it is logged with the host, port and reason. A query that runs but cannot yield an owner
    id is a configuration mistake and raises ConfigError.
    """
    settings = loaded.settings
    dsn = settings.secret("database_url")
    if not dsn:
        return ReplicaReport(False, "no REALTIME_DATABASE_URL")
    where = f"{server_of(dsn)} ({mask_dsn(dsn)})"
    try:
        conn = psycopg2.connect(dsn, connect_timeout=max(2, round(settings.db_connect_timeout)),
                                options=f"-c statement_timeout={int(settings.db_statement_timeout * 1000)}")
    except psycopg2.Error as exc:
        reason = describe_db_error(exc, dsn)
        log.warning("the read replica at %s does not answer: %s; WebSocket connections are closed 1013 "
                    "ownership_unavailable and /readyz answers 503 until it does", where, reason)
        return ReplicaReport(False, reason)
    try:
        conn.set_session(readonly=True)
        with conn.cursor() as cur:
            _probe_query(cur, loaded, dsn)
        if settings.batch_query_in_use() is not None and not conn.closed:
            try:
                conn.rollback()
            except psycopg2.Error:
                pass  # the replica went away mid-check: the single query's warning said so
            else:
                with conn.cursor() as cur:
                    _probe_batch_query(cur, loaded, dsn)
        elif settings.ownership_batch_query:
            log.warning("ownership_batch_query is the default but ownership_query is not: one query per diagnosis; "
                        "set ownership_batch_query to the batch form of your query to share queries in a storm")
    finally:
        conn.close()
    log.info("the read replica at %s answers and the ownership query returns an owner id", where)
    return ReplicaReport(True, "ok")


def _probe_batch_query(cur: psycopg2.extensions.cursor, loaded: Loaded, dsn: str) -> None:
    """The batch query must answer rows (diagnosis id, owner id) for an array of ids."""
    what = f"ownership_batch_query ({loaded.where('ownership_batch_query')})"
    try:
        cur.execute(loaded.settings.ownership_batch_query, {"diagnosis_ids": [0]})
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(f"{what} cannot be run: bad placeholder {exc}; write %(diagnosis_ids)s") from None
    except psycopg2.errors.QueryCanceled:
        log.warning("the ownership batch query did not finish within db_statement_timeout at start; checked later")
        return
    except psycopg2.Error as exc:
        if isinstance(exc, psycopg2.OperationalError):
            log.warning("the read replica failed the start-up check: %s", describe_db_error(exc, dsn))
            return
        raise ConfigError(f"{what} fails on the replica: {describe_db_error(exc, dsn)}") from None
    columns = cur.description or ()
    if len(columns) < 2 or any(c.type_code not in INTEGER_TYPES for c in columns[:2]):
        raise ConfigError(f"{what} must return two integer columns: the diagnosis id, then the owner's user id")


def _probe_query(cur: psycopg2.extensions.cursor, loaded: Loaded, dsn: str) -> None:
    query = loaded.settings.ownership_query
    what = f"ownership_query ({loaded.where('ownership_query')})"
    try:
        cur.execute(query, {"diagnosis_id": 0})
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # psycopg2 formatting the placeholders
        raise ConfigError(f"{what} cannot be run: bad placeholder {exc}; write %(diagnosis_id)s") from None
    except psycopg2.errors.QueryCanceled:
        log.warning("the ownership query did not finish within db_statement_timeout at start; checked later")
        return
    except psycopg2.Error as exc:
        if isinstance(exc, psycopg2.OperationalError):
            log.warning("the read replica failed the start-up check: %s", describe_db_error(exc, dsn))
            return
        raise ConfigError(f"{what} fails on the replica: {describe_db_error(exc, dsn)}") from None
    if cur.description is None or not cur.description:
        raise ConfigError(f"{what} returns no columns; it must SELECT the owner's user id")
    type_code = cur.description[0].type_code
    if type_code not in INTEGER_TYPES:
        cur.connection.rollback()
        cur.execute("SELECT format_type(%s, NULL)", (type_code,))
        row = cur.fetchone()
        type_name = row[0] if row else f"oid {type_code}"
        raise ConfigError(f"{what} returns a column of type {type_name}; it must return the owner's user id "
                          "as an integer (bigint)")
