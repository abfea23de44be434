"""Helpers for the client-library tests: a service that can be stopped and started again on the same port,
keeping its broker or getting a new one (history lost); a real `serve` process on Redis restarted with its
history kept; and a TCP proxy that loses answers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from realtime_service.broker.memory import MemoryBroker
from realtime_service.web.app import create_app
from realtime_service.web.state import STATE
from tests.cluster import NodeProcess, node_env, unique_prefix
from tests.fixtures_app import make_settings

WAIT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_broker() -> MemoryBroker:
    return MemoryBroker(100, 3600, 100, 600)


class RestartableService:
    """One service on a fixed loopback port. `restart(keep_history=True)` drains (1012), stops, and starts a
    new app on the same port with the same broker: what a node restart looks like with a broker that keeps
    history. With keep_history=False the new app gets a new broker (a new epoch): history is lost."""

    def __init__(self, pg_dsn: str, **overrides: Any) -> None:
        self.dsn = pg_dsn
        self.overrides = overrides
        self.port = free_port()
        self.broker = memory_broker()
        self.server: TestServer | None = None
        self.app: web.Application | None = None
        self.generation = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        settings = make_settings(self.dsn, **self.overrides)
        self.app = create_app(settings, broker=self.broker)
        self.server = TestServer(self.app, host="127.0.0.1", port=self.port)
        await self.server.start_server(shutdown_timeout=2.0)  # as run_server: idle keep-alives do not hold a stop
        self.generation += 1

    async def stop(self, drain: bool = True) -> None:
        if self.server is None or self.app is None:
            return
        node = self.app[STATE].node
        if drain:
            await node.drain(0)
            await asyncio.wait_for(self._drained(node), WAIT)
        await self.server.close()
        self.server = self.app = None

    @staticmethod
    async def _drained(node: Any) -> None:
        """Every connection closed (the node offers no event for it; this polls, bounded by the caller)."""
        for _ in range(int(WAIT / 0.02)):
            if not node.hub.count:
                return
            await asyncio.sleep(0.02)

    async def restart(self, keep_history: bool) -> None:
        await self.stop()
        if not keep_history:
            self.broker = memory_broker()
        await self.start()

    @property
    def node(self) -> Any:
        assert self.app is not None
        return self.app[STATE].node


class LosingProxy:
    """A TCP proxy on loopback in front of `upstream_port`. The first `lose` connections are forwarded to the
    service, but the service's answer is thrown away and the client's connection closed: the request was
    handled, its answer lost on the way back. Later connections pass through."""

    def __init__(self, upstream_port: int, lose: int = 1) -> None:
        self.upstream_port = upstream_port
        self.lose = lose
        self.connections = 0
        self.lost_answers = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        losing = self.connections <= self.lose
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        upstream = asyncio.create_task(pipe(reader, up_writer))
        self._tasks.add(upstream)
        upstream.add_done_callback(self._tasks.discard)
        try:
            if losing:
                answer = await asyncio.wait_for(up_reader.read(65536), WAIT)  # the service answered...
                assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
                self.lost_answers += 1  # ...and the answer never reaches the client
                writer.transport.abort()
                up_writer.close()
                return
            await pipe(up_reader, writer)
        finally:
            upstream.cancel()


class ServeProcess:
    """A real `realtime-service serve` process on the Redis broker, restartable on the same port: SIGTERM
    drains (every client closed 1012), the next start finds the history in Redis. This is the deploy the
    clients must ride out with no gap and no duplicate."""

    def __init__(self, pg_dsn: str, redis_url: str, log_dir: Path, **overrides: Any) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_base = f"ws://127.0.0.1:{port}"
        overrides.setdefault("allowed_origins", self.base_url)
        env = node_env(dsn=pg_dsn, redis_url=redis_url, prefix=unique_prefix("cl"), port=port, **overrides)
        self.node = NodeProcess("client-node", env, log_dir)

    async def start(self) -> None:
        await asyncio.to_thread(self.node.start)  # blocking waits off the loop: clients keep running

    async def stop(self) -> None:
        code = await asyncio.to_thread(self.node.terminate)
        assert code == 0, f"serve exited {code}:\n{self.node.log_tail()}"

    async def restart(self) -> None:
        await self.stop()
        await self.start()


class CuttingProxy:
    """A TCP proxy on loopback in front of `upstream_port`. The first connection is cut (both sides aborted,
    as a network drop would) right after the service's bytes containing `marker` have been passed on; later
    connections pass through. For WebSockets: the client received a frame that the service never saw
    confirmed."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        self.upstream_port = upstream_port
        self.marker = marker
        self.connections = 0
        self.cut = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cutting = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch: bool) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    if watch and self.marker in data:
                        self.cut += 1
                        for _ in range(100):  # abort() drops unsent bytes: let the kernel take them first
                            if not writer.transport.get_write_buffer_size():
                                break
                            await asyncio.sleep(0.01)
                        await asyncio.sleep(0.05)
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
            with contextlib.suppress(Exception):
                dst.close()

        tasks = [asyncio.create_task(pipe(reader, up_writer, False)),
                 asyncio.create_task(pipe(up_reader, writer, cutting))]
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
