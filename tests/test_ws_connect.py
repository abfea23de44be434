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
