"""PROTOCOL 3.7 as a property: random interleavings of publish, close, drop, reconnect and ack, on a real service.

Each hypothesis example starts its own service (real app, real sockets, real PostgreSQL) in its own event loop
(`asyncio.run`, so no pytest-aiohttp loop is involved) and drives a generated list of steps. A model predicts, for
every connection, exactly which broadcasts it must receive (replayed and live, in order) and the `recovered` flag
of every resume; the real clients must match it exactly:

- with `since`: every broadcast after `since`, in order; `recovered` true exactly when the epoch matches and
  `oldest retained - 1 <= since <= newest`, otherwise everything retained;
- without `since`: everything retained after the device's cursor, which only an `ack` moves here (the heartbeat
  is an hour, so no protocol PONG confirms anything); a device's first connection gets nothing old;
- live broadcasts on every open connection, none missing, none twice.

So a device that acks what it processed never sees a broadcast twice, and one that does not gets the unconfirmed
ones again on its next cursor resume, as PROTOCOL 3.7 requires.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from realtime_service.web.app import create_app
from realtime_service.web.state import STATE
from tests.fixtures_app import Service, make_settings
from tests.support import Client, Seeder, Tokens

HISTORY_SIZE = 4
DEVICES = ("phone", "tab")

Step = tuple[Any, ...]
MODES = ("since", "cursor", "bad_epoch")


@dataclass
class Device:
    """One device as the model sees it, with its live client if connected."""

    name: str
    client: Client | None = None
    expected: list[int] = field(default_factory=list)  # what the open connection must have received
    last: int = 0  # highest offset the app processed
    cursor: int | None = None  # the server's cursor for it; None until its first connection
    history: list[int] = field(default_factory=list)  # everything it received, over all connections
    repeat_floor: int = 0  # on the open connection, an offset seen before may come again only above this
    floors: list[int] = field(default_factory=list)  # repeat_floor of the connection each `history` entry came on


async def sync(client: Client) -> None:
    """Round-trip an application ping: the server handled everything sent before, and sent what it queued."""
    seen = len(client.of_type("pong"))
    await client.send({"type": "ping"})
    await client.wait(lambda c: len(c.of_type("pong")) > seen, "a pong")


async def drop(client: Client) -> None:
    """Cut the TCP connection without a close frame."""
    connection = client.ws._response.connection
    assert connection is not None
    assert connection.transport is not None
    connection.transport.abort()
    await client.wait(lambda c: c.closed, "the client to see its own drop")


class Scenario:
    """Runs steps against a service and checks every connection against the model."""

    def __init__(self, service: Service, uid: int, did: int) -> None:
        self.service = service
        self.uid = uid
        self.did = did
        self.token = service.tokens.user(uid)
        self.newest = 0
        self.epoch = ""
        self.devices = {name: Device(name) for name in DEVICES}

    def retained(self) -> list[int]:
        return list(range(max(1, self.newest - HISTORY_SIZE + 1), self.newest + 1))

    @property
    def oldest(self) -> int:
        return max(1, self.newest - HISTORY_SIZE + 1)

    def choices(self) -> list[Step]:
        """The steps that make sense now (publishing listed twice, so it is drawn more often)."""
        out: list[Step] = [("publish", 1), ("publish", 3)]
        for name, device in self.devices.items():
            if device.client is None:
                out.extend(("connect", name, mode) for mode in MODES)
            else:
                out.extend([("ack", name), ("close", name), ("drop", name)])
        return out

    async def run(self, data: st.DataObject) -> None:
        self.epoch = (await self.service.node.broker.position(self.did)).epoch
        for _ in range(data.draw(st.integers(8, 40), label="steps")):
            step = data.draw(st.sampled_from(self.choices()))
            await getattr(self, f"do_{step[0]}")(*step[1:])
        for device in self.devices.values():
            await self.do_close(device.name)
        self.check_no_confirmed_duplicates()

    async def do_publish(self, count: int) -> None:
        for _ in range(count):
            result = await self.service.publish(self.did, "test_event", {"n": self.newest + 1})
            self.newest += 1
            assert result["offset"] == self.newest
            assert result["epoch"] == self.epoch
            for device in self.devices.values():
                if device.client is not None:
                    device.expected.append(self.newest)
                    device.last = self.newest
        for device in self.devices.values():
            if device.client is not None:
                await device.client.wait_offset(self.newest)

    async def do_connect(self, name: str, mode: str) -> None:
        device = self.devices[name]
        if device.client is not None:
            return
        query: dict[str, Any] = {"device": name}
        replay: list[int] | None
        if mode == "cursor":
            cursor = self.newest if device.cursor is None else device.cursor
            replay = [o for o in self.retained() if o > cursor] or None
            recovered = self.oldest - 1 <= cursor
        else:
            since = device.last
            query.update(since=since, epoch=self.epoch if mode == "since" else "stale-epoch")
            recovered = mode == "since" and self.oldest - 1 <= since <= self.newest
            replay = [o for o in self.retained() if o > since] if recovered else self.retained()
        if device.cursor is None:
            device.cursor = self.newest
        # Unconfirmed frames come again on a cursor resume; a resume that was not recovered restarts the story.
        floor = device.cursor if mode == "cursor" else (device.last if recovered else 0)
        client = await self.service.connect(self.did, self.token, **query)
        await sync(client)
        hello = client.frames[0]["data"]
        assert hello["offset"] == self.newest
        assert hello["epoch"] == self.epoch
        frames = client.of_type("reconnect_messages")
        assert len(frames) <= 1
        where = f"{mode} resume of {name} (cursor {device.cursor}, last {device.last}, newest {self.newest})"
        if replay is None:  # nothing to send: the frame may be left out or empty
            assert not frames or frames[0]["data"] == {"messages": [], "recovered": True}, (where, frames)
        else:
            assert frames, f"no reconnect_messages on {where}"
            assert client.frames[1] is frames[0], f"reconnect_messages not right after connect on {where}"
            got = [m["offset"] for m in frames[0]["data"]["messages"]]
            assert got == replay, (where, got)
            assert frames[0]["data"]["recovered"] is recovered, where
        if replay:
            event(f"{mode} resume with a replay, recovered={recovered}")
        if mode == "cursor" and replay and device.cursor > 0 and device.cursor < self.newest:
            event("cursor resume after an ack")
        device.client = client
        device.repeat_floor = floor
        device.expected = list(replay or [])
        device.last = self.newest

    async def do_ack(self, name: str) -> None:
        device = self.devices[name]
        if device.client is None or device.last == 0:
            return
        await device.client.send({"type": "ack", "offset": device.last})
        await sync(device.client)
        assert device.cursor is not None
        device.cursor = max(device.cursor, device.last)

    async def do_close(self, name: str) -> None:
        device = self.devices[name]
        if device.client is not None:
            await device.client.close()
            self.finish(device)

    async def do_drop(self, name: str) -> None:
        device = self.devices[name]
        if device.client is not None:
            await drop(device.client)
            self.finish(device)

    def finish(self, device: Device) -> None:
        assert device.client is not None
        got = device.client.offsets()
        assert got == device.expected, f"{device.name} received {got}, expected {device.expected}"
        device.history.extend(got)
        device.floors.extend([device.repeat_floor] * len(got))
        device.client = None
        device.expected = []

    def check_no_confirmed_duplicates(self) -> None:
        """A device gets a broadcast twice only if it never confirmed it, or its resume was not recovered."""
        for device in self.devices.values():
            seen: set[int] = set()
            for offset, floor in zip(device.history, device.floors, strict=True):
                if offset in seen:
                    assert offset > floor, f"{device.name} got offset {offset} twice: {device.history}"
                seen.add(offset)


async def run_example(dsn: str, seed: Seeder, data: st.DataObject) -> None:
    uid, did = seed.owned()
    app = create_app(make_settings(dsn, heartbeat=3600, history_size=HISTORY_SIZE))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    http = aiohttp.ClientSession()
    try:
        service = Service(server, app, app[STATE].settings, http, Tokens(), seed)
        await Scenario(service, uid, did).run(data)
    finally:
        await http.close()
        await server.close()


# No shrinking: an example takes a real service and sockets, and shrinking one would outlast the test's timeout;
# the failing example's draws (every step) are printed as they are.
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], report_multiple_bugs=False,
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def test_every_device_gets_every_broadcast_once_in_order(pg_dsn: str, data: st.DataObject) -> None:
    asyncio.run(run_example(pg_dsn, Seeder(pg_dsn), data))
