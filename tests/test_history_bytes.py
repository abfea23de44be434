"""History bounded in bytes (PROTOCOL 3.7; issue 9 finding 5), on the memory broker and on Redis: a replay never
exceeds history_max_bytes, so a client whose messages are limited to 1 MiB (the Python `websockets` default) can
always resume; a message history could never hold is refused rather than lost to every reconnect."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.fixtures_app import Service, StartService

MIB = 1 << 20


@pytest.fixture(params=["memory", "redis"])
async def service(request: pytest.FixtureRequest, start_service: StartService) -> Service:
    extra: dict[str, Any] = {}
    if request.param == "redis":
        extra = {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": f"hb-{uuid.uuid4().hex[:8]}"}
    return await start_service(max_body_bytes=2 * MIB, **extra)


async def test_a_replay_stays_within_history_max_bytes_and_a_1_mib_client_resumes(service: Service) -> None:
    uid, did = service.seed.owned()
    epoch = ""
    for n in range(8):  # 8 x 300 KB: more than the 1 MiB history may keep
        result = await service.publish(did, "scan", {"n": n, "pad": "x" * 300_000})
        epoch = result["epoch"]
    ws = await service.http.ws_connect(service.ws_url(did, since=0, epoch=epoch),
                                       headers={"Authorization": f"Bearer {service.tokens.user(uid)}"},
                                       max_msg_size=MIB)  # a larger frame would fail this client
    try:
        connect = await ws.receive_json(timeout=10)
        assert connect["type"] == "connect"
        raw = await ws.receive(timeout=10)
        assert isinstance(raw.data, str), raw
        assert len(raw.data.encode()) <= MIB
        replay = json.loads(raw.data)
        offsets = [m["offset"] for m in replay["data"]["messages"]]
        assert offsets == list(range(offsets[0], 9)) and len(offsets) == 3  # the newest that fit, in order
        assert replay["data"]["recovered"] is False  # the oldest went for the bound: the client refetches
    finally:
        await ws.close()


async def test_a_broadcast_history_could_not_hold_is_refused_413(service: Service) -> None:
    _uid, did = service.seed.owned()
    body = await service.publish(did, "scan", {"pad": "x" * (MIB + 10)}, expect=413)
    assert "data" in body["error"]["fields"]
    assert (await service.publish(did, "after", {}))["offset"] == 1  # nothing was published by the refusal


async def test_kept_personal_messages_beyond_the_bound_wait_for_the_next_connection(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    for n in range(5):  # 5 x 300 KB kept while the user is away
        await service.publish(did, "dm", {"n": n, "pad": "y" * 300_000}, user_id=uid)
    got: list[int] = []
    for _ in range(3):
        ws = await service.http.ws_connect(service.ws_url(did), headers={"Authorization": f"Bearer {token}"},
                                           max_msg_size=MIB)
        try:
            assert (await ws.receive_json(timeout=10))["type"] == "connect"
            raw = await ws.receive(timeout=10)
            assert len(raw.data.encode()) <= MIB
            messages = json.loads(raw.data)["data"]["messages"]
            got += [m["data"]["n"] for m in messages]
            await ws.send_json({"type": "ack", "offset": 0})  # confirms what this frame carried
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=10))["type"] == "pong"
        finally:
            await ws.close()
        if len(got) == 5:
            break
    assert got == [0, 1, 2, 3, 4]  # every kept message once, oldest first, in frames that fit
