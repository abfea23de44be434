"""Shared parts of the fuzz tests: how many examples, which seed, and a log handler that catches crashes.

CI runs each fuzzer with a fixed seed and a bounded number of examples, so a run is repeatable and fast.
`REALTIME_FUZZ_EXAMPLES=5000` (and optionally `REALTIME_FUZZ_SEED=<n>`, `REALTIME_FUZZ_BUDGET=<seconds>`) asks
for a longer run of the same fuzzers: `REALTIME_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz_ws.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
from aiohttp.test_utils import BaseRunner, TestServer

from realtime_service.web.app import create_app
from realtime_service.web.edge import EdgeRunner
from realtime_service.web.state import STATE
from tests.fixtures_app import Service, StartService, make_settings
from tests.support import Seeder, Tokens

LONG_RUN = bool(os.environ.get("REALTIME_FUZZ_EXAMPLES"))
SEED = int(os.environ.get("REALTIME_FUZZ_SEED", "20261201"))


def examples(default: int) -> int:
    """Examples per fuzzer: the CI default, or REALTIME_FUZZ_EXAMPLES for a longer run."""
    return int(os.environ.get("REALTIME_FUZZ_EXAMPLES") or default)


def budget(default: float) -> float:
    """Seconds a fuzzer may spend sending examples (examples past it are not sent)."""
    if os.environ.get("REALTIME_FUZZ_BUDGET"):
        return float(os.environ["REALTIME_FUZZ_BUDGET"])
    return 3600.0 if LONG_RUN else default


class LogTrap(logging.Handler):
    """Collects every log record that shows a crash: ERROR and above, or any record carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def describe(self) -> str:
        lines = []
        for record in self.records[:5]:
            text = f"{record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
            lines.append(text[:500])
        return "\n".join(lines)

    def assert_clean(self) -> None:
        assert not self.records, f"{len(self.records)} crash record(s) in the service's logs:\n{self.describe()}"


@contextmanager
def trap_logs() -> Iterator[LogTrap]:
    """Attach a LogTrap to the root logger (INFO and above reach it) for the duration of the block."""
    trap = LogTrap()
    root = logging.getLogger()
    level = root.level
    root.addHandler(trap)
    root.setLevel(min(level or logging.WARNING, logging.INFO))
    try:
        yield trap
    finally:
        root.removeHandler(trap)
        root.setLevel(level)


async def eventually(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll a condition that has no event to wait on (a count the service keeps), up to `timeout` seconds."""
    for _ in range(max(1, int(timeout / step))):
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


class EdgeTestServer(TestServer):
    """aiohttp's TestServer, but serving through the runner `realtime-service serve` uses (web.edge.EdgeRunner):
    the same HTTP options, head deadline and server logger, so the logs checked are the logs production writes."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return EdgeRunner(self.app, **kwargs)


@asynccontextmanager
async def edge_services(pg_dsn: str, tokens: Tokens, seed: Seeder) -> AsyncIterator[StartService]:
    """Like the `start_service` fixture, behind EdgeRunner; every service is stopped at the end of the block."""
    started: list[Service] = []

    async def start(**overrides: Any) -> Service:
        app = create_app(make_settings(pg_dsn, **overrides))
        server = EdgeTestServer(app, host="127.0.0.1")
        await server.start_server()
        service = Service(server, app, app[STATE].settings, aiohttp.ClientSession(), tokens, seed)
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.http.close()
        await service.server.close()
