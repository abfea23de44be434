"""PROTOCOL 3.8 personal messages and PROTOCOL 4 idempotent publishing, over real WebSockets and HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

from realtime_service.broker.memory import MemoryBroker
from realtime_service.web.app import create_app
from tests.fixtures_app import Service, StartService, make_settings
from tests.support import WAIT, Client
from tests.wsraw import handshake

IDEMPOTENCY_TTL = 600.0


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


async def start_with_clock(start_service: StartService, pg_dsn: str, **overrides: Any) -> tuple[Service, Clock]:
    """A service whose broker runs on a clock the test moves (retention and idempotency TTLs without sleeping)."""
    settings = make_settings(pg_dsn, **overrides)
    clock = Clock()
    broker = MemoryBroker(settings.history_size, settings.history_ttl, settings.personal_inbox_size,
                          settings.idempotency_ttl, clock=clock)
    return await start_service(app=create_app(settings, broker=broker)), clock


async def post(service: Service, path: str, body: dict[str, Any], key: str | None = None,
               token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token or service.tokens.service()}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with service.http.post(f"{service.base_url}{path}", json=body, headers=headers) as resp:
        return resp.status, dict(await resp.json())


def personal(client: Client, type_: str = "nudge") -> list[dict[str, Any]]:
    """Personal frames of `type_` the client got, live or inside reconnect_messages."""
    out = [f for f in client.frames if f.get("type") == type_]
    for frame in client.of_type("reconnect_messages"):
        out.extend(m for m in frame["data"]["messages"] if m.get("type") == type_)
    return out


async def wait_detached(service: Service, did: int) -> None:
    """The server has let go of every connection to the diagnosis (presence is empty)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        async with service.http.get(f"{service.base_url}/api/v1/diagnoses/{did}/presence",
                                    headers={"Authorization": f"Bearer {service.tokens.service()}"}) as resp:
            if (await resp.json())["users"] == []:
                return
        if loop.time() > deadline:
            raise AssertionError(f"diagnosis {did} still has connections")
        await asyncio.sleep(0.02)


async def barrier(service: Service, did: int, client: Client, offset: int) -> None:
    """Publish a broadcast and wait for it: every frame meant for the client earlier has arrived by then."""
    assert (await service.publish(did, "marker", {}))["offset"] == offset
    await client.wait_offset(offset)


# -- personal messages -------------------------------------------------------------------------------------------


async def test_personal_message_reaches_the_users_connections_without_offset(service: Service) -> None:
    uid, did = service.seed.owned()
    other_did = service.seed.diagnosis(uid)
    token = service.tokens.user(uid)
    phone = await service.connect(did, token, device="phone")
    tab = await service.connect(did, token, device="tab")
    elsewhere = await service.connect(other_did, token)

    result = await service.publish(did, "nudge", {"text": "take your tea"}, user_id=uid)
    assert result["offset"] is None
    assert result["delivered"] == 2
    for client in (phone, tab):
        frame = (await client.wait(personal, "the personal message"))[0]
        assert frame["data"] == {"text": "take your tea"}
        assert frame["user_id"] == uid
        assert frame["diagnosis_id"] == did
        assert "offset" not in frame
    await barrier(service, did, phone, 1)  # the personal message took no offset
    assert (await service.publish(other_did, "marker", {}))["offset"] == 1
    await elsewhere.wait_offset(1)
    assert personal(elsewhere) == []
    for client in (phone, tab, elsewhere):
        await client.close()


async def test_personal_message_goes_only_to_that_user(start_service: StartService) -> None:
    service = await start_service(ownership_cache_ttl=0)
    old, did = service.seed.owned()
    old_client = await service.connect(did, service.tokens.user(old))
    new = service.seed.user()
    service.seed.set_owner(did, new)  # the old owner stays connected (nobody revoked)
    new_client = await service.connect(did, service.tokens.user(new))

    result = await service.publish(did, "nudge", {"for": "new"}, user_id=new)
    assert result["delivered"] == 1
    assert (await new_client.wait(personal, "the personal message"))[0]["data"] == {"for": "new"}
    await barrier(service, did, old_client, 1)
    assert personal(old_client) == []
    await old_client.close()
    await new_client.close()


async def test_personal_message_kept_offline_is_delivered_once(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    result = await service.publish(did, "nudge", {"n": 1}, user_id=uid)
    assert result["offset"] is None
    assert result["delivered"] == 0

    first = await service.connect(did, token, device="phone")
    await first.wait(lambda c: personal(c), "the kept personal message")
    replay = first.of_type("reconnect_messages")
    assert len(replay) == 1
    assert [m["data"] for m in replay[0]["data"]["messages"]] == [{"n": 1}]
    assert first.frames[1] is replay[0]  # right after connect
    await first.send({"type": "ack", "offset": 0})  # received: the message may leave the inbox (PROTOCOL 3.8)
    await first.send({"type": "ping"})
    await first.wait(lambda c: c.of_type("pong"), "the pong after the ack")
    await first.close()
    await wait_detached(service, did)

    for device in ("phone", "tab"):
        again = await service.connect(did, token, device=device)
        await barrier(service, did, again, 1 if device == "phone" else 2)
        assert personal(again) == [], f"delivered twice (to {device})"
        await again.close()
        await wait_detached(service, did)


async def test_a_kept_message_is_sent_again_until_a_connection_confirms_it(service: Service) -> None:
    """A connection that got the kept message but vanished before confirming it (no ack, no PONG) does not use
    it up: the next connection gets it again, with the same message_id so that the client drops the repeat."""
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    await service.publish(did, "nudge", {"n": 1}, user_id=uid)
    first = await service.connect(did, token)
    sent = (await first.wait(lambda c: personal(c), "the kept personal message"))[0]
    assert isinstance(sent["message_id"], str) and sent["message_id"]
    await first.close()  # without an ack; the server never PINGed it (long heartbeat), so nothing confirmed it
    await wait_detached(service, did)

    second = await service.connect(did, token)
    again = (await second.wait(lambda c: personal(c), "the kept message, sent again"))[0]
    assert again["message_id"] == sent["message_id"]
    assert again["data"] == {"n": 1}
    await second.send({"type": "ack", "offset": 0})
    await second.send({"type": "ping"})
    await second.wait(lambda c: c.of_type("pong"), "the pong after the ack")
    await second.close()
    await wait_detached(service, did)

    async def gone() -> bool:
        return await service.node.broker.kept_personal(did, uid) == []
    third = await service.connect(did, token)
    await barrier(service, did, third, 1)
    assert personal(third) == [], "confirmed, yet sent again"
    assert await gone()
    await third.close()


async def test_a_pong_after_the_kept_message_confirms_it(start_service: StartService) -> None:
    """A client that never acks still confirms by answering the protocol PING written after the message."""
    service = await start_service(heartbeat=0.3)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    await service.publish(did, "nudge", {"n": 1}, user_id=uid)
    first = await service.connect(did, token)  # aiohttp answers PINGs itself
    await first.wait(lambda c: personal(c), "the kept personal message")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await service.node.broker.kept_personal(did, uid):  # observable: the inbox the next connection reads
        assert loop.time() < deadline, "no PONG confirmed the kept message"
        await asyncio.sleep(0.05)
    await first.close()
    await wait_detached(service, did)
    second = await service.connect(did, token)
    await barrier(service, did, second, 1)
    assert personal(second) == []
    await second.close()


async def test_personal_message_is_kept_while_the_users_only_connection_is_closing(
        start_service: StartService) -> None:
    """A message answered `delivered: 0` must not vanish: the closing connection can no longer take it."""
    service = await start_service(rate_limit=1, rate_burst=1)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    raw = await handshake(service.ws_url(did), {"Authorization": f"Bearer {token}"})
    try:
        assert raw.status == 101
        assert (await raw.recv_frame())[0] == 0x1  # connect
        for _ in range(3):  # over the rate limit: the server closes `rate_limited`
            await raw.send_text('{"type": "ping"}')
        while (await raw.recv_frame())[0] != 0x8:
            pass
        # This client never answers the close frame, so the server is still closing it now.
        result = await service.publish(did, "nudge", {"n": 1}, user_id=uid)
        assert result["delivered"] == 0
    finally:
        raw.close()
    await wait_detached(service, did)
    client = await service.connect(did, token)
    await client.wait(lambda c: personal(c), "the personal message answered `delivered: 0`", timeout=3)
    await client.close()


async def test_kept_personal_messages_are_bounded_oldest_dropped(start_service: StartService) -> None:
    service = await start_service(personal_inbox_size=3)
    uid, did = service.seed.owned()
    for n in range(1, 6):
        await service.publish(did, "nudge", {"n": n}, user_id=uid)
    client = await service.connect(did, service.tokens.user(uid))
    await client.wait(lambda c: personal(c), "the kept personal messages")
    assert [m["data"]["n"] for m in personal(client)] == [3, 4, 5]
    await client.close()


async def test_kept_personal_messages_expire_with_history_ttl(start_service: StartService, pg_dsn: str) -> None:
    service, clock = await start_with_clock(start_service, pg_dsn, history_ttl=60)
    uid, did = service.seed.owned()
    await service.publish(did, "nudge", {"n": 1}, user_id=uid)
    clock.now += 61
    await service.publish(did, "nudge", {"n": 2}, user_id=uid)
    client = await service.connect(did, service.tokens.user(uid))
    await client.wait(lambda c: personal(c), "the kept personal message")
    assert [m["data"]["n"] for m in personal(client)] == [2]
    await client.close()


async def test_kept_personal_and_missed_broadcasts_share_the_resume_frame(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    client = await service.connect(did, token)
    epoch = client.frames[0]["data"]["epoch"]
    await client.close()
    await wait_detached(service, did)
    await service.publish(did, "test_event", {"n": 1})
    await service.publish(did, "nudge", {"n": 2}, user_id=uid)

    again = await service.connect(did, token, since=0, epoch=epoch)
    await again.wait(lambda c: c.of_type("reconnect_messages"), "reconnect_messages")
    replay = again.of_type("reconnect_messages")
    assert len(replay) == 1
    assert replay[0]["data"]["recovered"] is True
    assert sorted(m["type"] for m in replay[0]["data"]["messages"]) == ["nudge", "test_event"]
    await again.close()


async def test_personal_message_for_a_user_who_may_not_watch_is_422(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    for target in (service.seed.user(), service.seed.unknown()):
        status, body = await post(service, "/api/v1/publish",
                                  {"diagnosis_id": did, "type": "nudge", "data": {}, "user_id": target})
        assert status == 422, body
        assert "user_id" in body["error"]["fields"]
    await barrier(service, did, client, 1)
    assert personal(client) == []
    await client.close()


async def test_batch_with_a_personal_message_nobody_can_receive_publishes_nothing(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    messages = [{"diagnosis_id": did, "type": "test_event", "data": {}},
                {"diagnosis_id": did, "type": "nudge", "data": {}, "user_id": service.seed.user()}]
    status, body = await post(service, "/api/v1/publish/batch", {"messages": messages})
    assert status == 422, body
    assert any("user_id" in name for name in body["error"]["fields"])
    await barrier(service, did, client, 1)
    assert client.offsets() == [1]
    await client.close()


# -- idempotency ---------------------------------------------------------------------------------------------------


async def test_repeated_key_answers_the_first_result_and_broadcasts_nothing(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    body = {"diagnosis_id": did, "type": "test_event", "data": {"n": 1}}
    first = await post(service, "/api/v1/publish", body, key="order-17")
    repeat = await post(service, "/api/v1/publish", body, key="order-17")
    changed = await post(service, "/api/v1/publish", {**body, "data": {"n": 2}}, key="order-17")
    assert first[0] == 200
    assert first[1]["offset"] == 1
    assert repeat == first
    # the same key with another body is a caller's bug, not a retry: refused, and nothing published (PROTOCOL 4)
    assert changed[0] == 422, changed
    assert changed[1]["error"]["code"] == "idempotency_key_reused"
    assert "Idempotency-Key" in changed[1]["error"]["fields"]
    await barrier(service, did, client, 2)
    assert client.offsets() == [1, 2]
    await client.close()


async def test_the_same_key_from_another_caller_is_a_new_publish(service: Service) -> None:
    _uid, did = service.seed.owned()
    body = {"diagnosis_id": did, "type": "test_event", "data": {}}
    a = await post(service, "/api/v1/publish", body, key="k", token=service.tokens.service("main-api"))
    b = await post(service, "/api/v1/publish", body, key="k", token=service.tokens.service("billing"))
    again = await post(service, "/api/v1/publish", body, key="k", token=service.tokens.service("main-api"))
    assert (a[1]["offset"], b[1]["offset"], again[1]["offset"]) == (1, 2, 1)


async def test_concurrent_repeats_publish_once(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    body = {"diagnosis_id": did, "type": "test_event", "data": {}}
    answers = await asyncio.gather(*(post(service, "/api/v1/publish", body, key="burst") for _ in range(8)))
    assert {a[1]["offset"] for a in answers} == {1}
    await barrier(service, did, client, 2)
    assert client.offsets() == [1, 2]
    await client.close()


async def test_idempotent_batch_publishes_once(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    batch = {"messages": [{"diagnosis_id": did, "type": "test_event", "data": {"n": n}} for n in (1, 2, 3)]}
    first = await post(service, "/api/v1/publish/batch", batch, key="batch-1")
    repeat = await post(service, "/api/v1/publish/batch", batch, key="batch-1")
    assert first[0] == 200
    assert [r["offset"] for r in first[1]["results"]] == [1, 2, 3]
    assert repeat == first
    await barrier(service, did, client, 4)
    assert client.offsets() == [1, 2, 3, 4]
    await client.close()


async def test_idempotency_covers_the_typed_broadcast_endpoints(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    body = {"diagnosis_id": did, "feedback_id": 5, "rating": 4, "effectiveness": 0.5}
    first = await post(service, "/ws/broadcast-feedback-update", body, key="fb-5")
    repeat = await post(service, "/ws/broadcast-feedback-update", body, key="fb-5")
    assert first[0] == 200
    assert repeat == first
    await barrier(service, did, client, 2)
    assert [f["type"] for f in client.frames if "offset" in f] == ["feedback_update", "marker"]
    await client.close()


async def test_idempotency_key_is_remembered_for_ten_minutes(start_service: StartService, pg_dsn: str) -> None:
    service, clock = await start_with_clock(start_service, pg_dsn)
    _uid, did = service.seed.owned()
    body = {"diagnosis_id": did, "type": "test_event", "data": {}}
    first = await post(service, "/api/v1/publish", body, key="k")
    clock.now += IDEMPOTENCY_TTL - 1
    assert await post(service, "/api/v1/publish", body, key="k") == first
    clock.now += 2
    later = await post(service, "/api/v1/publish", body, key="k")
    assert later[0] == 200
    assert later[1]["offset"] == 2
