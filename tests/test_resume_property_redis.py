"""The PROTOCOL 3.7 resume property (tests/test_resume_property.py) against the Redis broker, over two nodes.

The same model and steps; the service is two apps (create_app with REALTIME_REDIS_URL in their settings) on one
Redis, and publishes and connections alternate between them, so a device resumes on the other node than the
one it left, and a publish answered by one node must reach the connections of the other, with cursors and
history read from Redis. One more step joins the mix: every pub/sub connection of the Redis killed
(`CLIENT KILL TYPE pubsub`), after which the model expects exactly the same deliveries (PROTOCOL 5.3: no gap).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import redis
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from realtime_service.settings import Settings
from realtime_service.web.app import create_app
from realtime_service.web.state import STATE
from tests.cluster import unique_prefix
from tests.fixtures_app import Service, make_settings
from tests.support import Client, Seeder, Tokens
from tests.test_resume_property import HISTORY_SIZE, Scenario, Step

PREFIX = unique_prefix("prop")


class TwoNodes:
    """Looks like one `Service` to the Scenario; each publish and each connection goes to the next node."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.tokens = services[0].tokens
        self._publishes = itertools.cycle(services)
        self._connections = itertools.cycle(services)

    @property
    def node(self) -> Any:
        return self.services[0].node

    async def publish(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return await next(self._publishes).publish(*args, **kwargs)

    async def connect(self, *args: Any, **kwargs: Any) -> Client:
        return await next(self._connections).connect(*args, **kwargs)


class RedisScenario(Scenario):
    """The model of test_resume_property, plus killing the nodes' pub/sub connections between any two steps."""

    def __init__(self, service: Any, uid: int, did: int, redis_url: str) -> None:
        super().__init__(service, uid, did)
        self.redis_url = redis_url

    def choices(self) -> list[Step]:
        return [*super().choices(), ("kill_pubsub",)]

    async def do_kill_pubsub(self) -> None:
        admin = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            killed = admin.client_kill_filter(_type="pubsub")
        finally:
            admin.close()
        event(f"pub/sub connections killed: {min(int(killed), 2)}{'+' if int(killed) > 2 else ''}")


def redis_settings(dsn: str, redis_url: str) -> Settings:
    extra: dict[str, Any] = {"redis_url": redis_url}
    if "redis_prefix" in Settings.model_fields:
        extra["redis_prefix"] = PREFIX
    return make_settings(dsn, heartbeat=3600, history_size=HISTORY_SIZE, **extra)


async def run_example(dsn: str, redis_url: str, seed: Seeder, data: st.DataObject) -> None:
    uid, did = seed.owned()
    servers: list[TestServer] = []
    http = aiohttp.ClientSession()
    tokens = Tokens()
    try:
        services = []
        for _ in range(2):
            app = create_app(redis_settings(dsn, redis_url))
            assert type(app[STATE].node.broker).__name__ == "RedisBroker", "REALTIME_REDIS_URL must select Redis"
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            services.append(Service(server, app, app[STATE].settings, http, tokens, seed))
        await RedisScenario(TwoNodes(services), uid, did, redis_url).run(data)
    finally:
        await http.close()
        for server in reversed(servers):
            await server.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], report_multiple_bugs=False,
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def test_every_device_gets_every_broadcast_once_in_order_over_two_redis_nodes(
        pg_dsn: str, redis_url: str, data: st.DataObject) -> None:
    asyncio.run(run_example(pg_dsn, redis_url, Seeder(pg_dsn), data))
