"""The Postgres read replica behind the ownership check, over aiopg connections (PROTOCOL 7).

Every failure of the replica, whatever its form, becomes OwnershipUnavailable within the connect and statement
timeouts, under asyncio's loop and under uvloop. Two aiopg behaviours make that need care (aio-libs/aiopg 856, 909):

- When libpq closes a connection's socket (a failed attempt: refused, the server shutting down, authentication;
  or a server gone mid-query), aiopg removes its reader but can leave its writer registered. On uvloop the stale,
  closed poll handle stays in the loop's table, and whoever is given the same descriptor number next fails in
  add_reader/add_writer with `RuntimeError: ... UVPoll closed=True ...`: the next replica connection (about every
  other attempt while the replica is down), or any other socket of the process that uses the loop's polls (an
  HTTP client's connect). `_Connection` fixes that where it starts: in the loop callback in which libpq closed
  the socket, before anyone can be given the number, it drops the registrations and tells aiopg the descriptor
  is gone. Belt and braces, this module keeps its own small pool (aiopg's gives no hook) and, after a failure and
  before each attempt, drops any registration the loop still holds for a descriptor that is closed (so nobody
  else's can be touched); attempts are made one at a time. A RuntimeError that still got through would be
  counted as unavailable like any other failure.
- When the server cancels a statement (statement_timeout), aiopg raises `asyncio.CancelledError` in place of
  `QueryCanceledError`. A CancelledError while our own task is not being cancelled is that, and is unavailable.
  The statement is bounded on the client first (aiopg's timeout, which also closes the connection) and the
  server's statement_timeout is set a little later, as a backstop that stops the work on the replica.

After a failed connection attempt, attempts within the next RETRY_AFTER seconds fail at once (a reconnect storm
against a replica that is down does not queue thousands of attempts), and a query that fails on a connection
taken from the pool is retried once on a new one (after a replica restart every pooled connection is dead, and
the first query after the replica's return should not be a 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiopg
import psycopg2

from realtime_service.db.describe import describe_db_error, server_of
from realtime_service.errors import OwnershipUnavailable

log = logging.getLogger("realtime.replica")

RECYCLE_AFTER = 300.0  # seconds a connection is used before it is replaced (a replica failover moves the DNS name)
RETRY_AFTER = 0.5  # seconds after a failed connection attempt during which new attempts fail at once
SERVER_TIMEOUT_MARGIN = 1.0  # seconds the server's statement_timeout runs after the client's
LOG_EVERY = 5.0  # seconds between two warnings of the same kind (an outage under load would flood the log)


@dataclass(eq=False)
class _Pooled:
    """One aiopg connection with the descriptor it was opened on (kept for the clean-up after a failure)."""

    conn: aiopg.Connection
    fd: int
    opened_at: float = field(default_factory=time.monotonic)


def _forget_descriptor(fd: int) -> None:
    """Drop any reader/writer the running loop still holds for `fd`, if `fd` is closed (nobody else's, then)."""
    if _is_open(fd):
        return  # open again: the number belongs to someone else now; theirs is not ours to touch
    loop = asyncio.get_running_loop()
    for remove in (loop.remove_writer, loop.remove_reader):
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            remove(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _Connection(aiopg.Connection):
    """aiopg's connection, letting go of its descriptor in the very callback where libpq closes it.

    aiopg's `_ready` handles a failure by removing its reader, and leaves its writer registered when libpq has
    already closed the socket (aio-libs/aiopg 856, 909). Done here, in the same loop callback, nobody can have
    been given the same descriptor number yet, so the registrations dropped are certainly this connection's; and
    aiopg is told the descriptor is gone, so its close() never touches a number that may belong to someone else.
    """

    @staticmethod
    def _ready(weak_self: Any) -> None:
        self = weak_self()
        if self is None:
            return
        fd = self._fileno
        aiopg.Connection._ready(weak_self)
        if fd is not None and not _is_open(fd):
            loop = self._loop
            for remove in (loop.remove_writer, loop.remove_reader):
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    remove(fd)
            self._fileno = None
            self._writing = False


def _next_descriptor() -> int:
    """The number the next socket will get (POSIX gives the lowest free one); -1 if none can be opened."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return -1
    os.close(fd)
    return fd


class PostgresOwnership:
    """OwnershipSource over aiopg."""

    def __init__(self, dsn: str, query: str, pool_min: int, pool_max: int, connect_timeout: float,
                 statement_timeout: float, observe: Callable[[str, float], None] | None = None,
                 batch_query: str | None = None) -> None:
        self._dsn = dsn
        self._query = query
        self._batch_query = batch_query or None  # rows (diagnosis id, owner id) for %(diagnosis_ids)s
        self._pool_min = min(pool_min, pool_max)
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._observe = observe
        self._idle: list[_Pooled] = []
        self._open = 0  # connections open or being opened
        self._slots = asyncio.Semaphore(pool_max)  # queries at once: never more than pool_max connections
        self._connecting = asyncio.Lock()  # one attempt at a time (see the module docstring)
        self._failed_at = -RETRY_AFTER
        self._filling: asyncio.Task[None] | None = None
        self._closed = False
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, repeats not logged since)
        self._server = server_of(dsn)  # host:port, for log lines (never the DSN: it may hold a password)

    # -- the public face -----------------------------------------------------------------------------------

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

    @property
    def batching(self) -> bool:
        """Many diagnoses can be asked in one query (REALTIME_OWNERSHIP_BATCH_QUERY is set)."""
        return self._batch_query is not None

    async def owners_of(self, diagnosis_ids: Sequence[int]) -> dict[int, int | None]:
        """Owners of many diagnoses in one query; an id the replica returns no row for has no diagnosis."""
        assert self._batch_query is not None
        started = time.perf_counter()
        try:
            rows = await self._bounded(self._batch_query, {"diagnosis_ids": list(diagnosis_ids)})
        except OwnershipUnavailable:
            if self._observe is not None:
                self._observe("unavailable", time.perf_counter() - started)
            raise
        if self._observe is not None:
            self._observe("ok", time.perf_counter() - started)
        owners: dict[int, int | None] = dict.fromkeys(diagnosis_ids)
        answered: set[int] = set()
        for row in rows:
            diagnosis_id = int(row[0]) if row[0] is not None else None
            if diagnosis_id in owners and diagnosis_id not in answered:  # the first row decides, as with one id
                answered.add(diagnosis_id)
                owners[diagnosis_id] = int(row[1]) if row[1] is not None else None
        return owners

    async def ping(self) -> None:
        await self._bounded("SELECT 1", None)

    async def close(self) -> None:
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
        idle, self._idle = self._idle, []
        for pooled in idle:
            self._discard(pooled)

    # -- bounding every failure --------------------------------------------------------------------------

    async def _bounded(self, sql: str, params: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        budget = self._connect_timeout + self._statement_timeout + 0.5  # a backstop; aiopg's timeouts come first
        try:
            async with asyncio.timeout(budget):
                return await self._run(sql, params)
        except OwnershipUnavailable as exc:
            self._warn("fast", "replica at %s unavailable: %s", self._server, exc.message)
            raise
        except TimeoutError:
            self._warn("timeout", "replica at %s did not answer in time (connect %.1fs, statement %.1fs)",
                       self._server, self._connect_timeout, self._statement_timeout)
            raise OwnershipUnavailable("the read replica did not answer in time") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled (the caller left, or shutdown): not the replica's doing
            # aiopg's rendering of QueryCanceledError: the server's statement_timeout fired
            self._warn("cancelled", "replica at %s cancelled the statement (statement_timeout)", self._server)
            raise OwnershipUnavailable("the read replica did not answer in time") from None
        except (psycopg2.Error, OSError, RuntimeError) as exc:
            # The server's own words, one line, password masked: the class name alone says nothing.
            self._warn(type(exc).__name__, "replica error at %s: %s: %s", self._server, type(exc).__name__,
                       describe_db_error(exc, self._dsn))
            raise OwnershipUnavailable("the read replica is unavailable") from None

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """One WARNING per kind per LOG_EVERY seconds, saying how many were held back."""
        now = time.monotonic()
        last, held = self._warned.get(kind, (-LOG_EVERY, 0))
        if now - last < LOG_EVERY:
            self._warned[kind] = (last, held + 1)
            return
        self._warned[kind] = (now, 0)
        if held:
            message += f" ({held} more like it in the last {now - last:.0f}s)"
        log.warning(message, *args)

    async def _run(self, sql: str, params: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        if self._closed:
            raise OwnershipUnavailable("the read replica pool is closed")
        async with self._slots:
            pooled = self._take_idle()
            if pooled is not None:
                try:
                    return await self._execute(pooled, sql, params)
                except (psycopg2.OperationalError, psycopg2.InterfaceError):
                    # Probably dead since the replica restarted, and so are its idle siblings: retry once, fresh.
                    for stale in self._idle:
                        self._discard(stale)
                    self._idle.clear()
            return await self._execute(await self._connect(), sql, params)

    async def _execute(self, pooled: _Pooled, sql: str, params: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        healthy = False
        try:
            async with pooled.conn.cursor() as cur:
                await cur.execute(sql, params, timeout=self._statement_timeout)
                rows: list[tuple[Any, ...]] = await cur.fetchall() if cur.description else []
            healthy = True
            return rows
        finally:
            if healthy and not self._closed:
                self._idle.append(pooled)
            else:
                self._discard(pooled)  # a failed or cancelled statement leaves the session in doubt

    # -- the pool ------------------------------------------------------------------------------------------

    def _take_idle(self) -> _Pooled | None:
        now = time.monotonic()
        while self._idle:
            pooled = self._idle.pop()
            if not pooled.conn.closed and now - pooled.opened_at < RECYCLE_AFTER:
                return pooled
            self._discard(pooled)
        return None

    async def _connect(self) -> _Pooled:
        async with self._connecting:
            if time.monotonic() - self._failed_at < RETRY_AFTER:
                raise OwnershipUnavailable("the read replica is unavailable (retrying shortly)")
            self._open += 1
            try:
                pooled = await self._open_one()
            except BaseException:
                self._open -= 1
                self._failed_at = time.monotonic()
                raise
        self._failed_at = -RETRY_AFTER
        if self._open < self._pool_min and (self._filling is None or self._filling.done()):
            self._filling = asyncio.ensure_future(self._fill())
        return pooled

    async def _open_one(self) -> _Pooled:
        options = f"-c statement_timeout={int((self._statement_timeout + SERVER_TIMEOUT_MARGIN) * 1000)}"
        # A stale registration left on the number libpq's socket is about to get (by an attempt whose clean-up
        # had to be skipped, or by another user of aiopg in this loop) would fail this attempt in add_reader.
        upcoming = _next_descriptor()
        if upcoming >= 0:
            _forget_descriptor(upcoming)
        conn = _Connection(self._dsn, self._connect_timeout, enable_json=False, enable_hstore=False,
                                enable_uuid=False, connect_timeout=max(1, round(self._connect_timeout)),
                                options=options)
        fd = conn.raw.fileno()
        try:
            await conn
        except BaseException:
            conn.close()
            _forget_descriptor(fd)
            raise
        return _Pooled(conn, fd)

    async def _fill(self) -> None:
        """Open connections up to pool_min in the background (REALTIME_DB_POOL_MIN); failures wait for next use."""
        while not self._closed and self._open < self._pool_min:
            try:
                async with self._connecting:
                    self._open += 1
                    try:
                        pooled = await asyncio.wait_for(self._open_one(), self._connect_timeout + 0.5)
                    except BaseException:
                        self._open -= 1
                        raise
            except Exception:  # the next query tries again and reports what is wrong
                return
            if self._closed:
                self._discard(pooled)
                return
            self._idle.append(pooled)

    def _discard(self, pooled: _Pooled) -> None:
        self._open -= 1
        try:
            pooled.conn.close()
        except (psycopg2.Error, OSError, RuntimeError) as exc:
            log.debug("closing a replica connection: %s", type(exc).__name__)
        _forget_descriptor(pooled.fd)
