"""PROTOCOL 3.1-3.3 over real WebSockets: the three ways to authenticate, the connect frame, refusals."""

from __future__ import annotations

import uuid

import pytest

from tests.fixtures_app import Service, StartService
from tests.support import Client

METHODS = ["auth_frame", "header", "query"]


@pytest.mark.parametrize("method", METHODS)
async def test_each_auth_method_gets_connect_frame(service: Service, method: str) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid), method)
    hello = client.frames[0]
    assert hello["diagnosis_id"] == did
    assert hello["data"]["user_id"] == uid
    assert hello["data"]["offset"] == 0
    uuid.UUID(hello["data"]["session"])
    assert hello["data"]["message"] == "Successfully connected to diagnosis updates"
    assert hello["timestamp"].endswith("Z")
    await client.close()


@pytest.mark.parametrize(("case", "reason"), [("unknown", "diagnosis_not_found"), ("stranger", "forbidden"),
                                              ("expired", "token_expired"), ("garbage", "invalid_token"),
                                              ("service", "forbidden")])
async def test_refusals_close_1008_with_reason(service: Service, case: str, reason: str) -> None:
    uid, did = service.seed.owned()
    token = {
        "unknown": service.tokens.user(uid),
        "stranger": service.tokens.user(service.seed.user()),
        "expired": service.tokens.user(uid, ttl=-3600),
        "garbage": "not-a-jwt",
        "service": service.tokens.service(sub=str(uid)),
    }[case]
    target = service.seed.unknown() if case == "unknown" else did
    client = await service.open(target, token, "header")
    assert await client.wait_closed() == 1008
    assert client.close_reason == reason
    assert not client.of_type("connect")


async def test_broadcast_reaches_subscriber_with_offset(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    result = await service.publish(did, "herb_update", {"herb": "mint"})
    assert result["offset"] == 1 and result["delivered"] == 1
    frame = await client.next_of("herb_update")
    assert frame["offset"] == 1 and frame["epoch"] == client.frames[0]["data"]["epoch"]
    assert frame["data"] == {"herb": "mint"}
    await client.close()


async def test_frames_flow_with_compression_on(start_service: StartService) -> None:
    """With REALTIME_WS_COMPRESSION the writer goes through aiohttp (which deflates): frames still arrive in order."""
    service = await start_service(ws_compression=True)
    uid, did = service.seed.owned()
    ws = await service.http.ws_connect(service.ws_url(did), compress=15,
                                       headers={"Authorization": f"Bearer {service.tokens.user(uid)}"})
    client = Client(ws).start()
    await client.wait(lambda c: c.frames, "the connect frame")
    assert ws.compress == 15, "permessage-deflate was not negotiated"
    for i in range(20):
        await service.publish(did, "compressed", {"i": i, "pad": "x" * 500})
    await client.wait_offset(20)
    assert [f["data"]["i"] for f in client.of_type("compressed")] == list(range(20))
    await client.close()


async def test_device_in_query_survives_first_frame_auth(service: Service) -> None:
    """PROTOCOL 3.7: the device may be given as ?device= even when the token comes in the auth frame."""
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid), "auth_frame", device="phone")
    async with service.http.get(f"{service.base_url}/api/v1/diagnoses/{did}/presence",
                                headers={"Authorization": f"Bearer {service.tokens.service()}"}) as resp:
        presence = await resp.json()
    assert presence["users"] == [{"user_id": uid, "connections": 1, "devices": ["phone"]}]
    await client.close()


async def test_connection_admitted_while_draining_is_closed_service_restart(service: Service) -> None:
    """PROTOCOL 8: a client still sending its auth frame when the drain starts is closed 1012, not left open."""
    uid, did = service.seed.owned()
    ws = await service.http.ws_connect(service.ws_url(did))
    client = Client(ws).start()
    await service.node.drain(0.1)  # nobody registered yet: this client is between upgrade and auth
    await client.send({"type": "auth", "token": service.tokens.user(uid)})
    assert await client.wait_closed() == 1012
    assert client.close_reason == "service_restart"
    assert not client.of_type("connect")


async def test_admission_failure_that_is_a_bug_closes_1011(start_service: StartService) -> None:
    """A replica answer the service cannot read (a non-integer owner) is a bug: close 1011, never accept."""

    class BrokenSource:
        async def owner_of(self, diagnosis_id: int) -> int | None:
            raise ValueError("owner is not an integer")

        async def ping(self) -> None:
            return None

        async def close(self) -> None:
            return None

    from realtime_service.web.app import create_app
    from tests.fixtures_app import make_settings

    probe = await start_service()
    app = create_app(make_settings(probe.seed.dsn), ownership_source=BrokenSource())
    service = await start_service(app=app)
    uid, did = service.seed.owned()
    client = await service.open(did, service.tokens.user(uid))
    assert await client.wait_closed() == 1011
    assert client.close_reason == "internal_error"
    assert not client.of_type("connect")


def test_a_replay_larger_than_the_outbox_does_not_make_a_slow_consumer() -> None:
    """The connect frame and replay are forced in whole; live frames after them still get the full allowance."""
    from realtime_service.outbox import Outbox

    outbox = Outbox(max_bytes=1024, max_messages=100)
    outbox.force(b"r" * 5000)
    assert outbox.offer(b"live" * 100)
    assert outbox.pop() == (b"r" * 5000, None)
    assert outbox.offer(b"x" * 500)
    assert not outbox.offer(b"y" * 200), "the byte limit still holds for live frames"
