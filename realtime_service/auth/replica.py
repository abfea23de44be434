"""The Postgres read replica behind the ownership check, through an aiopg pool (PROTOCOL 7).

The pool is made on first use and remade after failures, so the service starts and keeps running while the
replica is down; every call is bounded by the connect and statement timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiopg
import psycopg2

from realtime_service.db.describe import describe_db_error, server_of
from realtime_service.errors import OwnershipUnavailable

log = logging.getLogger("realtime.replica")


class PostgresOwnership:
    """OwnershipSource over aiopg."""

    def __init__(self, dsn: str, query: str, pool_min: int, pool_max: int, connect_timeout: float,
                 statement_timeout: float, observe: Callable[[str, float], None] | None = None) -> None:
        self._dsn = dsn
        self._query = query
        self._pool_min = min(pool_min, pool_max)
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._pool: aiopg.Pool | None = None
        self._pool_future: asyncio.Future[aiopg.Pool] | None = None
        self._observe = observe

    async def _get_pool(self) -> aiopg.Pool:
        if self._pool is not None and not self._pool.closed:
            return self._pool
        if self._pool_future is None:
            self._pool_future = asyncio.ensure_future(self._create_pool())
        future = self._pool_future
        try:
            self._pool = await asyncio.shield(future)
        except BaseException:
            if self._pool_future is future and future.done():
                self._pool_future = None
            raise
        return self._pool

    async def _create_pool(self) -> aiopg.Pool:
        return await aiopg.create_pool(
            self._dsn, minsize=self._pool_min, maxsize=self._pool_max,
            timeout=self._statement_timeout + self._connect_timeout,
            connect_timeout=max(1, round(self._connect_timeout)),
            options=f"-c statement_timeout={int(self._statement_timeout * 1000)}",
            pool_recycle=300,
        )

    async def _run(self, sql: str, params: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, params)
            rows: list[tuple[Any, ...]] = await cur.fetchall() if cur.description else []
            return rows

    async def _bounded(self, sql: str, params: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        budget = self._connect_timeout + self._statement_timeout
        try:
            return await asyncio.wait_for(self._run(sql, params), budget)
        except TimeoutError:
            log.warning("replica at %s did not answer within %.1fs", server_of(self._dsn), budget)
            raise OwnershipUnavailable("the read replica did not answer in time") from None
        except (psycopg2.Error, OSError) as exc:
            # The server's own words, one line, password masked: the class name alone says nothing.
            log.warning("replica error at %s: %s: %s", server_of(self._dsn), type(exc).__name__,
                        describe_db_error(exc, self._dsn))
            raise OwnershipUnavailable("the read replica is unavailable") from None

    async def owner_of(self, diagnosis_id: int) -> int | None:
        started = time.perf_counter()
        try:
            rows = await self._bounded(self._query, {"diagnosis_id": diagnosis_id})
        except OwnershipUnavailable:
            if self._observe is not None:
                self._observe("unavailable", time.perf_counter() - started)
            raise
        if self._observe is not None:
            self._observe("ok", time.perf_counter() - started)
        if not rows:
            return None
        owner = rows[0][0]
        return int(owner) if owner is not None else None

    async def ping(self) -> None:
        await self._bounded("SELECT 1", None)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()
