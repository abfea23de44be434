"""Operational endpoints: liveness, readiness, metrics (PROTOCOL 4)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from realtime_service.errors import ServiceError
from realtime_service.web.http import json_response
from realtime_service.web.state import STATE

READY_TIMEOUT = 3.0


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the replica (and the broker, if any) answer; 503 naming what is down."""
    node = request.app[STATE].node
    checks: dict[str, str] = {}
    for name, probe in (("replica", node.ownership.source.ping), ("broker", node.broker.ping)):
        try:
            await asyncio.wait_for(probe(), READY_TIMEOUT)
            checks[name] = "ok"
        except (ServiceError, TimeoutError, OSError):
            checks[name] = "down"
    if node.draining:
        checks["node"] = "draining"
    down = sorted(k for k, v in checks.items() if v != "ok")
    body: dict[str, object] = {"status": "ready" if not down else "unavailable", "checks": checks}
    if down:
        body["down"] = down
    return json_response(body, 200 if not down else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    payload = request.app[STATE].metrics.render()
    response = web.Response(body=payload)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
