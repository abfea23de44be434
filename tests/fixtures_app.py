"""App-level fixtures: the real service app on a loopback port, with a real PostgreSQL behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from realtime_service.settings import Settings, load_settings
from realtime_service.web.app import create_app
from realtime_service.web.state import STATE
from tests.support import SECRET, Client, Seeder, Tokens


@dataclass
class Service:
    """A running service app and everything a test needs to talk to it."""

    server: TestServer
    app: web.Application
    settings: Settings
    http: aiohttp.ClientSession
    tokens: Tokens
    seed: Seeder

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/"))[:-1]

    def ws_url(self, diagnosis_id: int | str, **query: Any) -> str:
        url = self.server.make_url(f"/ws/{diagnosis_id}")
        return str(url.with_query({k: str(v) for k, v in query.items() if v is not None}))

    @property
    def node(self) -> Any:
        return self.app[STATE].node

    async def open(self, diagnosis_id: int, token: str | None, method: str = "header",
                   headers: dict[str, str] | None = None, auth_extra: dict[str, Any] | None = None,
                   **query: Any) -> Client:
        """Open a connection authenticated by header, query or first frame; returns a started reader."""
        hdrs = dict(headers or {})
        if method == "header" and token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if method == "query" and token is not None:
            query["token"] = token
        ws = await self.http.ws_connect(self.ws_url(diagnosis_id, **query), headers=hdrs, autoping=True,
                                        max_msg_size=0)
        client = Client(ws).start()
        if method == "auth_frame":
            frame: dict[str, Any] = {"type": "auth"}
            if token is not None:
                frame["token"] = token
            frame.update(auth_extra or {})
            await client.send(frame)
        return client

    async def connect(self, diagnosis_id: int, token: str, method: str = "header", **kw: Any) -> Client:
        """Open a connection that must be accepted: its first frame is `connect`."""
        client = await self.open(diagnosis_id, token, method, **kw)
        await client.wait(lambda c: c.frames, "the connect frame")
        assert client.frames[0]["type"] == "connect", client.frames[0]
        return client

    async def publish(self, diagnosis_id: int, type_: str = "test_event", data: Any = None,
                      token: str | None = None, expect: int = 200, **extra: Any) -> dict[str, Any]:
        body = {"diagnosis_id": diagnosis_id, "type": type_, "data": {} if data is None else data, **extra}
        async with self.http.post(f"{self.base_url}/api/v1/publish", json=body,
                                  headers={"Authorization": f"Bearer {token or self.tokens.service()}"}) as resp:
            payload: dict[str, Any] = await resp.json()
            assert resp.status == expect, payload
            return payload


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def seed(pg_dsn: str) -> Seeder:
    return Seeder(pg_dsn)


def make_settings(dsn: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": dsn, "jwt_secret": SECRET, "host": "127.0.0.1", "port": 0,
                              "log_level": "INFO"}
    values.update(overrides)
    return load_settings({}, defaults=values)


@pytest.fixture
async def start_service(pg_dsn: str, tokens: Tokens, seed: Seeder) -> AsyncIterator[StartService]:
    """start_service(**settings) -> a Service on a free loopback port; all are stopped after the test."""
    started: list[Service] = []

    async def start(app: web.Application | None = None, **overrides: Any) -> Service:
        settings = make_settings(pg_dsn, **overrides)
        app = app or create_app(settings)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        service = Service(server, app, app[STATE].settings, aiohttp.ClientSession(), tokens, seed)
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.http.close()
        await service.server.close()


@pytest.fixture
async def service(start_service: StartService) -> Service:
    """The service with default settings."""
    return await start_service()
