"""PROTOCOL 3.7 delivery cursors (device, ack, PONG confirmation, resend) and the deliveries/revoke endpoints."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from realtime_service.web.app import create_app
from tests.fixtures_app import Service, StartService, make_settings
from tests.support import WAIT, Client


async def drop(client: Client) -> None:
    """Cut the TCP connection without a close frame, as a phone losing its network does."""
    transport = client.ws._response.connection.transport  # type: ignore[union-attr]
    assert transport is not None
    transport.abort()
    await client.wait(lambda c: c.closed, "the client to see its own drop")


async def sync(client: Client) -> None:
    """Round-trip an application ping: everything the client sent before it has been handled."""
    seen = len(client.of_type("pong"))
    await client.send({"type": "ping"})
    await client.wait(lambda c: len(c.of_type("pong")) > seen, "a pong")


async def ack(client: Client, offset: int) -> None:
    await client.send({"type": "ack", "offset": offset})
    await sync(client)


async def get_json(service: Service, path: str, token: str | None = None,
                   method: str = "GET", body: Any = None) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with service.http.request(method, f"{service.base_url}{path}", headers=headers, json=body) as resp:
        return resp.status, await resp.json()


async def deliveries(service: Service, did: int) -> dict[str, Any]:
    status, body = await get_json(service, f"/api/v1/diagnoses/{did}/deliveries", service.tokens.service())
    assert status == 200, body
    return dict(body)


async def wait_until(condition: Any, what: str, timeout: float = WAIT) -> None:
    """Poll an observable condition (an endpoint's answer) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_confirmed(service: Service, did: int, device: str, offset: int, timeout: float = WAIT) -> None:
    async def confirmed() -> bool:
        body = await deliveries(service, did)
        return any(d["device"] == device and d["confirmed_offset"] >= offset for d in body["devices"])

    await wait_until(confirmed, f"device {device!r} to confirm offset {offset}", timeout)


async def wait_detached(service: Service, did: int) -> None:
    """The server has let go of every connection to the diagnosis."""
    async def gone() -> bool:
        status, body = await get_json(service, f"/api/v1/diagnoses/{did}/presence", service.tokens.service())
        return status == 200 and body["users"] == []

    await wait_until(gone, f"diagnosis {did} to have no connections")


async def publish_n(service: Service, did: int, first: int, last: int) -> None:
    for n in range(first, last + 1):
        assert (await service.publish(did, "test_event", {"n": n}))["offset"] == n


def replayed(client: Client) -> list[int]:
    return [m["offset"] for f in client.of_type("reconnect_messages") for m in f["data"]["messages"]]


async def settled(client: Client, live_offset: int) -> None:
    """Wait for a live frame published after connecting: everything the connection replays came before it."""
    await client.wait_offset(live_offset)


# -- cursors per device, ack ------------------------------------------------------------------------------------


async def test_each_device_resumes_from_its_own_cursor(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    phone = await service.connect(did, token, device="phone")
    tab = await service.connect(did, token, device="tab")
    await publish_n(service, did, 1, 2)
    await phone.wait_offset(2)
    await tab.wait_offset(2)
    await ack(phone, 2)
    await phone.close()
    await tab.close()
    await wait_detached(service, did)
    await publish_n(service, did, 3, 4)

    phone = await service.connect(did, token, device="phone")
    tab = await service.connect(did, token, device="tab")
    await publish_n(service, did, 5, 5)
    await settled(phone, 5)
    await settled(tab, 5)
    assert phone.offsets() == [3, 4, 5]
    assert phone.of_type("reconnect_messages")[0]["data"]["recovered"] is True
    assert tab.offsets() == [1, 2, 3, 4, 5]  # never confirmed 1 and 2: sent again
    await phone.close()
    await tab.close()


async def test_device_named_in_the_auth_frame_gets_its_own_cursor(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    client = await service.connect(did, token, "auth_frame", auth_extra={"device": "tab-7"})
    await publish_n(service, did, 1, 3)
    await client.wait_offset(3)
    await ack(client, 3)
    body = await deliveries(service, did)
    assert [(d["user_id"], d["device"], d["confirmed_offset"]) for d in body["devices"]] == [(uid, "tab-7", 3)]
    await client.close()
    await wait_detached(service, did)
    await publish_n(service, did, 4, 4)
    again = await service.connect(did, token, "auth_frame", auth_extra={"device": "tab-7"})
    await publish_n(service, did, 5, 5)
    await settled(again, 5)
    assert again.offsets() == [4, 5]
    await again.close()


async def test_connections_without_a_device_share_the_default_cursor(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    await publish_n(service, did, 1, 1)
    await client.wait_offset(1)
    await ack(client, 1)
    body = await deliveries(service, did)
    assert [(d["device"], d["confirmed_offset"]) for d in body["devices"]] == [("default", 1)]
    await client.close()


async def test_an_ack_beyond_what_was_sent_does_not_skip_later_messages(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    client = await service.connect(did, token, device="phone")
    await publish_n(service, did, 1, 2)
    await client.wait_offset(2)
    await ack(client, 99)
    await client.close()
    await wait_detached(service, did)
    await publish_n(service, did, 3, 3)
    again = await service.connect(did, token, device="phone")
    await publish_n(service, did, 4, 4)
    await settled(again, 4)
    assert again.offsets() == [3, 4]
    await again.close()


async def test_a_device_that_never_connected_gets_nothing_old(service: Service) -> None:
    uid, did = service.seed.owned()
    await publish_n(service, did, 1, 3)
    client = await service.connect(did, service.tokens.user(uid), device="brand-new")
    assert client.frames[0]["data"]["offset"] == 3
    await publish_n(service, did, 4, 4)
    await settled(client, 4)
    assert client.offsets() == [4]
    assert replayed(client) == []
    await client.close()


# -- confirmation by protocol PONG, resend after a drop -----------------------------------------------------------


async def test_pong_after_the_frames_were_written_confirms_them(start_service: StartService) -> None:
    service = await start_service(heartbeat=0.3)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    client = await service.connect(did, token, device="watch")  # autoping: answers protocol PINGs, never acks
    await publish_n(service, did, 1, 3)
    await client.wait_offset(3)
    await wait_confirmed(service, did, "watch", 3)
    await client.close()
    await wait_detached(service, did)
    await publish_n(service, did, 4, 4)
    again = await service.connect(did, token, device="watch")
    await publish_n(service, did, 5, 5)
    await settled(again, 5)
    assert again.offsets() == [4, 5]
    await again.close()


async def test_pong_confirms_frames_that_came_in_the_replay(start_service: StartService) -> None:
    service = await start_service(heartbeat=0.3)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    first = await service.connect(did, token, device="watch")
    await first.close()
    await wait_detached(service, did)
    await publish_n(service, did, 1, 3)

    second = await service.connect(did, token, device="watch")
    await second.wait_offset(3)
    assert replayed(second) == [1, 2, 3]
    # Several heartbeats pass with PONGs answered: the replayed frames were written before them.
    await wait_confirmed(service, did, "watch", 3, timeout=3)
    await second.close()
    await wait_detached(service, did)

    third = await service.connect(did, token, device="watch")
    await publish_n(service, did, 4, 4)
    await settled(third, 4)
    assert third.offsets() == [4], "frames confirmed by PONG were sent again"
    await third.close()


async def test_frames_written_to_a_connection_that_died_unconfirmed_are_sent_again(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    client = await service.connect(did, token, device="phone")
    await publish_n(service, did, 1, 2)
    await client.wait_offset(2)
    await drop(client)
    await wait_detached(service, did)
    await publish_n(service, did, 3, 3)

    again = await service.connect(did, token, device="phone")
    await publish_n(service, did, 4, 4)
    await settled(again, 4)
    assert again.offsets() == [1, 2, 3, 4]
    assert again.of_type("reconnect_messages")[0]["data"]["recovered"] is True
    await again.close()


async def test_acked_frames_are_not_sent_again_after_a_drop(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    client = await service.connect(did, token, device="phone")
    await publish_n(service, did, 1, 3)
    await client.wait_offset(3)
    await ack(client, 2)
    await drop(client)
    await wait_detached(service, did)
    again = await service.connect(did, token, device="phone")
    await publish_n(service, did, 4, 4)
    await settled(again, 4)
    assert again.offsets() == [3, 4]
    await again.close()


# -- GET deliveries ----------------------------------------------------------------------------------------------


async def test_deliveries_shape(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    phone = await service.connect(did, token, device="phone")
    tab = await service.connect(did, token, device="tab")
    await publish_n(service, did, 1, 2)
    await phone.wait_offset(2)
    await tab.wait_offset(2)
    before = datetime.now(UTC)
    await ack(phone, 2)
    await ack(tab, 1)

    body = await deliveries(service, did)
    assert body["diagnosis_id"] == did
    assert body["offset"] == 2
    assert [(d["user_id"], d["device"], d["confirmed_offset"]) for d in body["devices"]] == [
        (uid, "phone", 2), (uid, "tab", 1)]
    for device in body["devices"]:
        assert set(device) == {"user_id", "device", "confirmed_offset", "confirmed_at"}
        stamp = datetime.fromisoformat(device["confirmed_at"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=2) <= stamp <= datetime.now(UTC) + timedelta(seconds=2)
    await phone.close()
    await tab.close()


async def test_deliveries_of_a_diagnosis_nobody_watched(service: Service) -> None:
    _uid, did = service.seed.owned()
    body = await deliveries(service, did)
    assert body["diagnosis_id"] == did
    assert body["offset"] == 0
    assert body["devices"] == []


@pytest.mark.parametrize(("who", "status"), [("nobody", 401), ("owner", 403), ("unknown", 404)])
@pytest.mark.parametrize("endpoint", ["deliveries", "revoke"])
async def test_service_endpoints_refuse(service: Service, who: str, status: int, endpoint: str) -> None:
    uid, did = service.seed.owned()
    token = {"nobody": None, "owner": service.tokens.user(uid), "unknown": service.tokens.service()}[who]
    target = service.seed.unknown() if who == "unknown" else did
    method = "GET" if endpoint == "deliveries" else "POST"
    got, body = await get_json(service, f"/api/v1/diagnoses/{target}/{endpoint}", token, method,
                               {} if method == "POST" else None)
    assert got == status, body
    assert "error" in body


# -- POST revoke -------------------------------------------------------------------------------------------------


async def revoke(service: Service, did: int, body: dict[str, Any]) -> None:
    status, answer = await get_json(service, f"/api/v1/diagnoses/{did}/revoke", service.tokens.service(), "POST",
                                    body)
    assert status == 200, answer


async def test_revoke_one_user_closes_their_connections_forbidden(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    phone = await service.connect(did, token, device="phone")
    tab = await service.connect(did, token, device="tab")
    service.seed.set_owner(did, service.seed.user())
    await revoke(service, did, {"user_id": uid})
    for client in (phone, tab):
        assert await client.wait_closed() == 1008
        assert client.close_reason == "forbidden"


async def test_revoke_keeps_connections_the_replica_still_allows(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    await revoke(service, did, {})
    await revoke(service, did, {"user_id": uid})
    await revoke(service, did, {"user_id": service.seed.user()})
    await sync(client)
    await publish_n(service, did, 1, 1)
    await client.wait_offset(1)
    assert not client.closed
    await client.close()


async def test_revoke_everyone_drops_the_cached_decision(service: Service) -> None:
    old, did = service.seed.owned()
    new = service.seed.user()
    watching = await service.connect(did, service.tokens.user(old))
    service.seed.set_owner(did, new)

    early = await service.open(did, service.tokens.user(new))  # the cached decision still names the old owner
    assert await early.wait_closed() == 1008
    assert early.close_reason == "forbidden"
    assert not watching.closed

    await revoke(service, did, {})
    assert await watching.wait_closed() == 1008
    assert watching.close_reason == "forbidden"
    allowed = await service.connect(did, service.tokens.user(new))
    await publish_n(service, did, 1, 1)
    await allowed.wait_offset(1)
    await allowed.close()


async def test_revoke_without_a_body_means_everyone(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    service.seed.set_owner(did, service.seed.user())
    async with service.http.post(f"{service.base_url}/api/v1/diagnoses/{did}/revoke",
                                 headers={"Authorization": f"Bearer {service.tokens.service()}"}) as resp:
        assert resp.status == 200, await resp.text()
    assert await client.wait_closed() == 1008
    assert client.close_reason == "forbidden"


class GatedOwnership:
    """An ownership source whose first answer is held until the test releases it (a slow replica query)."""

    def __init__(self, owners: dict[int, int]) -> None:
        self.owners = owners
        self.release = asyncio.Event()
        self.first_started = asyncio.Event()
        self.calls = 0

    async def owner_of(self, diagnosis_id: int) -> int | None:
        self.calls += 1
        answer = self.owners.get(diagnosis_id)  # read now, as the replica would
        if self.calls == 1:
            self.first_started.set()
            await self.release.wait()
        return answer

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_revoke_also_closes_a_connection_admitted_by_a_lookup_from_before_it(
        start_service: StartService, pg_dsn: str) -> None:
    """A connect whose ownership answer was read before the revoke must not survive it."""
    old, did = 7_000_001, 7_000_002
    source = GatedOwnership({did: old})
    service = await start_service(app=create_app(make_settings(pg_dsn), ownership_source=source))
    client = await service.open(did, service.tokens.user(old))
    await asyncio.wait_for(source.first_started.wait(), WAIT)  # old owner's admission read "old" ...
    source.owners[did] = 7_000_003  # ... then ownership moved, and the main API revoked
    await revoke(service, did, {})
    source.release.set()
    assert await client.wait_closed() == 1008
    assert client.close_reason == "forbidden"
