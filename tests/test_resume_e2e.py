"""PROTOCOL 3.7 over real WebSockets: resume with `since` + `epoch`, and when `recovered` is false."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from realtime_service.broker.memory import MemoryBroker
from realtime_service.web.app import create_app
from tests.fixtures_app import Service, StartService, make_settings
from tests.support import Client


def replays(client: Client) -> list[dict[str, Any]]:
    return client.of_type("reconnect_messages")


async def the_replay(client: Client) -> dict[str, Any]:
    """The one reconnect_messages frame, which must come right after `connect`."""
    await client.wait(replays, "the reconnect_messages frame")
    assert [f["type"] for f in client.frames[:2]] == ["connect", "reconnect_messages"], client.frames[:2]
    assert len(replays(client)) == 1
    return client.frames[1]


def replay_offsets(frame: dict[str, Any]) -> list[int]:
    return [m["offset"] for m in frame["data"]["messages"]]


async def publish_n(service: Service, did: int, first: int, last: int) -> str:
    epoch = ""
    for n in range(first, last + 1):
        result = await service.publish(did, "test_event", {"n": n})
        assert result["offset"] == n
        epoch = result["epoch"]
    return epoch


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("method", ["query", "auth_frame"])
async def test_resume_gets_exactly_the_missed_broadcasts_then_live_ones(service: Service, method: str) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    first = await service.connect(did, token)
    epoch = first.frames[0]["data"]["epoch"]
    await publish_n(service, did, 1, 2)
    await first.wait_offset(2)
    await first.close()
    await publish_n(service, did, 3, 5)

    resume: dict[str, Any] = {"since": 2, "epoch": epoch}
    if method == "query":
        client = await service.connect(did, token, **resume)
    else:
        client = await service.connect(did, token, "auth_frame", auth_extra=resume)
    replay = await the_replay(client)
    assert replay["data"]["recovered"] is True
    assert replay_offsets(replay) == [3, 4, 5]
    assert [m["data"] for m in replay["data"]["messages"]] == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert {m["epoch"] for m in replay["data"]["messages"]} == {epoch}
    assert client.frames[0]["data"]["offset"] == 5

    await publish_n(service, did, 6, 6)
    await client.wait_offset(6)
    assert client.offsets() == [3, 4, 5, 6]
    await client.close()


async def test_no_gap_or_duplicate_at_the_seam_while_publishes_continue(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    total = 150
    published = 0

    async def publisher() -> None:
        nonlocal published
        for n in range(1, total + 1):
            await service.publish(did, "test_event", {"n": n})
            published = n

    client = await service.connect(did, token)
    epoch = client.frames[0]["data"]["epoch"]
    task = asyncio.create_task(publisher())
    last = 0
    try:
        for _ in range(6):  # reconnect several times while the publisher runs
            target = published + 5
            await client.wait(lambda c, t=target: published >= t or task.done(), "more publishes")
            await client.close()
            got = client.offsets()
            assert got == list(range(last + 1, last + 1 + len(got))), f"gap or duplicate after {last}: {got}"
            last = got[-1] if got else last
            client = await service.connect(did, token, since=last, epoch=epoch)
            replay = await the_replay(client)
            assert replay["data"]["recovered"] is True
        await task
        await client.wait_offset(total)
    finally:
        await task
    got = client.offsets()
    assert got == list(range(last + 1, total + 1))
    await client.close()


async def test_wrong_epoch_is_not_recovered_and_gets_everything_retained(service: Service) -> None:
    uid, did = service.seed.owned()
    await publish_n(service, did, 1, 3)
    client = await service.connect(did, service.tokens.user(uid), since=2, epoch="not-this-history")
    replay = await the_replay(client)
    assert replay["data"]["recovered"] is False
    assert replay_offsets(replay) == [1, 2, 3]
    await client.close()


async def test_resume_without_epoch_is_not_recovered(service: Service) -> None:
    uid, did = service.seed.owned()
    await publish_n(service, did, 1, 2)
    client = await service.connect(did, service.tokens.user(uid), since=1)
    replay = await the_replay(client)
    assert replay["data"]["recovered"] is False
    assert replay_offsets(replay) == [1, 2]
    await client.close()


async def test_since_older_than_retention_is_not_recovered(start_service: StartService) -> None:
    service = await start_service(history_size=3)
    uid, did = service.seed.owned()
    epoch = await publish_n(service, did, 1, 6)
    token = service.tokens.user(uid)

    lost = await service.connect(did, token, since=1, epoch=epoch)
    replay = await the_replay(lost)
    assert replay["data"]["recovered"] is False
    assert replay_offsets(replay) == [4, 5, 6]
    await lost.close()

    boundary = await service.connect(did, token, since=3, epoch=epoch)  # oldest retained - 1: nothing lost
    replay = await the_replay(boundary)
    assert replay["data"]["recovered"] is True
    assert replay_offsets(replay) == [4, 5, 6]
    await boundary.close()


async def test_since_newer_than_newest_is_not_recovered(service: Service) -> None:
    uid, did = service.seed.owned()
    epoch = await publish_n(service, did, 1, 3)
    client = await service.connect(did, service.tokens.user(uid), since=10, epoch=epoch)
    replay = await the_replay(client)
    assert replay["data"]["recovered"] is False
    assert replay_offsets(replay) == [1, 2, 3]
    await client.close()


async def test_since_equal_to_newest_is_recovered_with_nothing_to_send(service: Service) -> None:
    uid, did = service.seed.owned()
    epoch = await publish_n(service, did, 1, 3)
    client = await service.connect(did, service.tokens.user(uid), since=3, epoch=epoch)
    replay = await the_replay(client)
    assert replay["data"] == {"messages": [], "recovered": True}
    await publish_n(service, did, 4, 4)
    await client.wait_offset(4)
    assert client.offsets() == [4]
    await client.close()


async def test_retention_by_age_is_not_recovered(start_service: StartService, pg_dsn: str) -> None:
    settings = make_settings(pg_dsn, history_ttl=60)
    clock = Clock()
    broker = MemoryBroker(settings.history_size, settings.history_ttl, settings.personal_inbox_size,
                          settings.idempotency_ttl, clock=clock)
    service = await start_service(app=create_app(settings, broker=broker))
    uid, did = service.seed.owned()
    epoch = await publish_n(service, did, 1, 2)
    clock.now += 61
    await publish_n(service, did, 3, 3)
    token = service.tokens.user(uid)

    expired = await service.connect(did, token, since=0, epoch=epoch)
    replay = await the_replay(expired)
    assert replay["data"]["recovered"] is False
    assert replay_offsets(replay) == [3]
    await expired.close()

    fine = await service.connect(did, token, since=2, epoch=epoch)
    replay = await the_replay(fine)
    assert replay["data"]["recovered"] is True
    assert replay_offsets(replay) == [3]
    await fine.close()


async def test_resume_by_a_user_who_lost_the_diagnosis_is_forbidden(start_service: StartService) -> None:
    service = await start_service(ownership_cache_ttl=0)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    client = await service.connect(did, token)
    epoch = client.frames[0]["data"]["epoch"]
    await client.close()
    await publish_n(service, did, 1, 2)
    service.seed.set_owner(did, service.seed.user())

    resumed = await service.open(did, token, since=0, epoch=epoch)
    assert await resumed.wait_closed() == 1008
    assert resumed.close_reason == "forbidden"
    assert resumed.frames == []


async def test_resume_with_an_expired_token_is_refused(service: Service) -> None:
    uid, did = service.seed.owned()
    epoch = await publish_n(service, did, 1, 1)
    resumed = await service.open(did, service.tokens.user(uid, ttl=-3600), "auth_frame",
                                 auth_extra={"since": 0, "epoch": epoch})
    assert await resumed.wait_closed() == 1008
    assert resumed.close_reason == "token_expired"
    assert resumed.frames == []
