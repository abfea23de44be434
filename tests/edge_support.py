"""The service behind the same HTTP server `realtime-service serve` runs (web.edge.EdgeRunner), on loopback, and a
raw TCP client for requests no well-behaved client would send."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from realtime_service.web.app import create_app
from realtime_service.web.edge import EdgeRunner
from tests.fixtures_app import make_settings


@dataclass
class EdgeServer:
    runner: EdgeRunner
    app: web.Application
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        assert self.runner.server is not None
        return len(self.runner.server.connections)


StartEdge = Callable[..., Awaitable[EdgeServer]]


@pytest.fixture
async def start_edge(pg_dsn: str) -> AsyncIterator[StartEdge]:
    """start_edge(**settings) -> the app behind an EdgeRunner on a free loopback port; stopped after the test."""
    started: list[EdgeRunner] = []

    async def start(**overrides: Any) -> EdgeServer:
        app = create_app(make_settings(pg_dsn, **overrides))
        runner = EdgeRunner(app)
        await runner.setup()
        started.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return EdgeServer(runner, app, port)

    yield start
    for runner in reversed(started):
        await runner.cleanup()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after `timeout`."""
    data = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"the server kept the connection open for {timeout} s; got {data[:200]!r}")
        try:
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
        except TimeoutError:
            continue
        except ConnectionError:
            return data
        if not chunk:
            return data
        data += chunk


def close_quietly(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
