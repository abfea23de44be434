"""Test helpers: tokens, seeding, and a WebSocket client over aiohttp that awaits frames with timeouts."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import psycopg2

SECRET = "test-secret-" + secrets.token_hex(16)
WAIT = 10.0


class Tokens:
    """Mints the tokens the main API would issue, remembering each (secrecy checks look for them in logs)."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.minted: list[str] = []

    def encode(self, claims: dict[str, Any], key: Any = None, algorithm: str = "HS256") -> str:
        token = jwt.encode(claims, self.secret if key is None else key, algorithm=algorithm)
        self.minted.append(token)
        return token

    def user(self, user_id: int, ttl: float = 3600, **extra: Any) -> str:
        now = int(time.time())
        return self.encode({"sub": str(user_id), "iat": now, "exp": now + ttl, **extra})

    def service(self, sub: str = "main-api", ttl: float = 3600, **extra: Any) -> str:
        now = int(time.time())
        return self.encode({"sub": sub, "scope": "realtime:publish", "iat": now, "exp": now + ttl, **extra})


class Seeder:
    """Users and diagnoses inserted with plain SQL; ids never repeat within a run."""

    _ids = itertools.count(int(time.time() * 1000) % 10**9 * 10)

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def _exec(self, sql: str, params: tuple[Any, ...]) -> None:
        conn = psycopg2.connect(self.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
        finally:
            conn.close()

    def user(self) -> int:
        uid = next(self._ids)
        self._exec("INSERT INTO users (id) VALUES (%s)", (uid,))
        return uid

    def diagnosis(self, owner: int) -> int:
        did = next(self._ids)
        self._exec("INSERT INTO diagnoses (id, user_id) VALUES (%s, %s)", (did, owner))
        return did

    def owned(self) -> tuple[int, int]:
        uid = self.user()
        return uid, self.diagnosis(uid)

    def unknown(self) -> int:
        return next(self._ids)

    def set_owner(self, diagnosis_id: int, user_id: int) -> None:
        self._exec("UPDATE diagnoses SET user_id = %s WHERE id = %s", (user_id, diagnosis_id))


@dataclass
class Client:
    """One WebSocket connection with a background reader: await frames by predicate, with a timeout."""

    ws: aiohttp.ClientWebSocketResponse
    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _consumed: int = 0

    def start(self) -> Client:
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self.frames.append(json.loads(msg.data))
                    self._event.set()
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    self.close_reason = msg.extra if isinstance(msg.extra, str) else None
                    await self.ws.close()
                    break
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSING):
                    break
        finally:
            self.close_code = self.ws.close_code
            self._event.set()

    @property
    def closed(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait(self, predicate: Any, what: str, timeout: float = WAIT) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._event.clear()
            value = predicate(self)
            if value:
                return value
            if self.closed:
                raise AssertionError(f"closed ({self.close_code}) before {what}; frames: {self.frames[-5:]}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; frames: {self.frames[-5:]}")
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                pass

    async def next_of(self, type_: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next frame of this type not yet returned by next_of (frames may arrive before the call)."""

        def found(c: Client) -> dict[str, Any] | None:
            for index in range(c._consumed, len(c.frames)):
                if c.frames[index].get("type") == type_:
                    c._consumed = index + 1
                    return c.frames[index]
            return None

        return await self.wait(found, f"a {type_!r} frame", timeout)

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == type_]

    def offsets(self) -> list[int]:
        out: list[int] = []
        for f in self.frames:
            if f.get("type") == "reconnect_messages":
                out.extend(m["offset"] for m in f["data"]["messages"] if "offset" in m)
            elif isinstance(f.get("offset"), int):
                out.append(f["offset"])
        return out

    async def wait_offset(self, offset: int, timeout: float = WAIT) -> None:
        await self.wait(lambda c: offset in c.offsets(), f"offset {offset}", timeout)

    async def wait_closed(self, timeout: float = WAIT) -> int | None:
        await self.wait(lambda c: c.closed, "the server to close", timeout)
        return self.close_code

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def close(self) -> None:
        if not self.ws.closed:
            await asyncio.wait_for(self.ws.close(), 5)
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)
