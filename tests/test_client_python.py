"""The Python client (PROTOCOL 9) against the live service over loopback: subscribe receives, acks, resumes
across a restart without a gap or a duplicate, reports lost history before what follows, refreshes its token
in-band, stops with a typed error where retrying cannot help; Publisher retries with one Idempotency-Key."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from realtime_service.client import (
    Backoff,
    DiagnosisNotFound,
    Forbidden,
    HistoryLost,
    IdempotencyKeyReused,
    InvalidToken,
    Publisher,
    RetryBudget,
    ServiceUnavailable,
    State,
    TokenExpired,
    Unauthorized,
    ValidationFailed,
    policy,
    subscribe,
)
from tests.client_support import CuttingProxy, LosingProxy, RestartableService, ServeProcess, free_port
from tests.fixtures_app import Service, StartService
from tests.support import Seeder, Tokens

WAIT = 10.0
FAST = Backoff(base=0.05, cap=0.3)


class Follower:
    """Runs `subscribe` in a task and records every item and state change."""

    def __init__(self, url: str, diagnosis_id: int, token: Any, **kw: Any) -> None:
        self.items: list[Any] = []
        self.states: list[State] = []
        self.error: BaseException | None = None
        self.urls: list[str] = []
        self._changed = asyncio.Event()
        self._args = (url, diagnosis_id, token)
        self._kw = kw
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Follower:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        trace = aiohttp.TraceConfig()

        async def on_start(_s: Any, _c: Any, params: aiohttp.TraceRequestStartParams) -> None:
            self.urls.append(str(params.url))

        trace.on_request_start.append(on_start)
        async with aiohttp.ClientSession(trace_configs=[trace]) as http:
            try:
                async for item in subscribe(*self._args, session=http, on_state=self._state,
                                            backoff=self._kw.pop("backoff", FAST), **self._kw):
                    self.items.append(item)
                    self._changed.set()
            except Exception as exc:  # recorded for the test to inspect
                self.error = exc
            finally:
                self._changed.set()

    def _state(self, state: State) -> None:
        self.states.append(state)
        self._changed.set()

    async def wait(self, predicate: Any, what: str, timeout: float = WAIT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            if self.task is not None and self.task.done():
                raise AssertionError(f"the subscription ended ({self.error!r}) before {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; items {self.items[-5:]}, "
                                     f"states {[s.state for s in self.states][-8:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):  # woken by an item or a state; re-checked at least every 50 ms
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))

    def offsets(self) -> list[int]:
        return [i["offset"] for i in self.items if isinstance(i, dict) and "offset" in i]

    def lives(self) -> int:
        return sum(1 for s in self.states if s.state == "live")

    async def wait_offsets(self, expected: list[int]) -> None:
        await self.wait(lambda f: len(f.offsets()) >= len(expected), f"offsets {expected}")
        assert self.offsets() == expected

    async def wait_ended(self) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, WAIT)

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@pytest.fixture
async def followers() -> AsyncIterator[list[Follower]]:
    started: list[Follower] = []
    yield started
    for follower in started:
        await follower.stop()


def follow(started: list[Follower], url: str, diagnosis_id: int, token: Any, **kw: Any) -> Follower:
    follower = Follower(url, diagnosis_id, token, **kw).start()
    started.append(follower)
    return follower


def ws_base(service: Service) -> str:
    return service.base_url.replace("http://", "ws://", 1)


async def confirmed_offset(base_url: str, http: aiohttp.ClientSession, tokens: Tokens, did: int,
                           device: str) -> int | None:
    async with http.get(f"{base_url}/api/v1/diagnoses/{did}/deliveries",
                        headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
        body = await resp.json()
    for entry in body["devices"]:
        if entry["device"] == device:
            return int(entry["confirmed_offset"])
    return None


async def test_subscribe_receives_in_order_and_acks(service: Service, followers: list[Follower]) -> None:
    uid, did = service.seed.owned()
    follower = follow(followers, ws_base(service), did, service.tokens.user(uid), device="py-worker")
    await follower.wait(lambda f: f.lives() == 1, "live")
    for n in range(3):
        await service.publish(did, "note", {"n": n})
    await follower.wait_offsets([1, 2, 3])
    assert [i["data"] for i in follower.items] == [{"n": 0}, {"n": 1}, {"n": 2}]
    # The iterator asked for a fourth item, so the third is processed: the ack reaches the server's cursor.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while await confirmed_offset(service.base_url, service.http, service.tokens, did, "py-worker") != 3:
        assert loop.time() < deadline, "the ack never reached the delivery cursor"
        await asyncio.sleep(0.1)
    assert all("token" not in url for url in follower.urls)
    assert all("?" not in url for url in follower.urls)  # first-frame auth: nothing in the URL


async def test_restart_with_history_kept_gives_no_gap_and_no_duplicate(
        pg_dsn: str, redis_url: str, tmp_path: Path, seed: Seeder, tokens: Tokens,
        followers: list[Follower]) -> None:
    """A deploy: the `serve` process on Redis is stopped (SIGTERM drains: 1012) and started again; publishes go
    on while it is down and after. The subscription hands over every offset once, in order."""
    service = ServeProcess(pg_dsn, redis_url, tmp_path)
    await service.start()
    uid, did = seed.owned()
    try:
        async with Publisher(service.base_url, tokens.service()) as publisher:
            follower = follow(followers, service.ws_base, did, tokens.user(uid))
            await follower.wait(lambda f: f.lives() == 1, "live")
            for n in range(3):
                await publisher.publish(did, "before", {"n": n})
            await follower.wait_offsets([1, 2, 3])

            await service.stop()
            await follower.wait(lambda f: any(s.code == 1012 for s in f.states), "a 1012 close")
            await service.start()  # the same Redis: history kept
            for n in range(3, 6):
                await publisher.publish(did, "while_away", {"n": n})  # most land before the reconnect
            await follower.wait(lambda f: f.lives() == 2, "the second connection")
            for n in range(6, 8):
                await publisher.publish(did, "after", {"n": n})
            await follower.wait_offsets(list(range(1, 9)))
        assert [i["data"]["n"] for i in follower.items] == list(range(8))
        assert not any(isinstance(i, HistoryLost) for i in follower.items)
        assert len({i["epoch"] for i in follower.items}) == 1
    finally:
        await service.stop()


async def test_restart_that_loses_history_yields_history_lost_first(
        pg_dsn: str, seed: Seeder, tokens: Tokens, followers: list[Follower]) -> None:
    service = RestartableService(pg_dsn)
    await service.start()
    try:
        uid, did = seed.owned()
        async with Publisher(service.base_url, tokens.service()) as publisher:
            follower = follow(followers, service.ws_base, did, tokens.user(uid))
            await follower.wait(lambda f: f.lives() == 1, "live")
            first = await publisher.publish(did, "before", {"n": 0})
            await follower.wait_offsets([1])

            await service.restart(keep_history=False)  # a memory node restarted: a new epoch
            second = await publisher.publish(did, "after_restart", {"n": 1})
            assert second["epoch"] != first["epoch"]
            await follower.wait(lambda f: any(isinstance(i, HistoryLost) for i in f.items), "HistoryLost")
            await publisher.publish(did, "live_again", {"n": 2})
            await follower.wait(lambda f: len(f.items) >= 4, "the messages after the loss")
        lost_at = next(n for n, i in enumerate(follower.items) if isinstance(i, HistoryLost))
        lost = follower.items[lost_at]
        assert lost_at == 1  # after the first message, before everything of the new history
        assert lost.previous is not None
        assert (lost.previous.offset, lost.previous.epoch) == (1, first["epoch"])
        assert lost.epoch == second["epoch"]
        after = follower.items[lost_at + 1:]
        assert [(i["type"], i["offset"], i["epoch"]) for i in after] == [
            ("after_restart", 1, second["epoch"]), ("live_again", 2, second["epoch"])]
    finally:
        await service.stop(drain=False)


@pytest.mark.slow
async def test_token_about_to_expire_is_refreshed_in_band(start_service: StartService,
                                                          followers: list[Follower]) -> None:
    service = await start_service(jwt_leeway=0)
    uid, did = service.seed.owned()
    issued: list[str] = []

    def token() -> str:  # the first token lives 3 s; the refresh gets an hour
        issued.append(service.tokens.user(uid, ttl=3 if not issued else 3600))
        return issued[-1]

    follower = follow(followers, ws_base(service), did, token)
    await follower.wait(lambda f: f.lives() == 1, "live")
    await follower.wait(lambda f: len(issued) == 2, "the refresh", timeout=6)
    first_exp = policy.token_expiry(issued[0])
    assert first_exp is not None and time.time() < first_exp
    await asyncio.sleep(max(0.0, first_exp + 1.0 - time.time()))  # past the first exp (leeway 0)
    await service.publish(did, "after_expiry", {})
    await follower.wait_offsets([1])
    assert [s.state for s in follower.states] == ["connecting", "live"]  # no reconnect
    assert service.node.hub.count == 1


async def test_forbidden_and_bad_tokens_stop_with_typed_errors(service: Service,
                                                               followers: list[Follower]) -> None:
    _uid, did = service.seed.owned()
    stranger = follow(followers, ws_base(service), did, service.tokens.user(service.seed.user()))
    garbage = follow(followers, ws_base(service), did, "not-a-jwt")
    missing = follow(followers, ws_base(service), service.seed.unknown(), service.tokens.user(1))
    expired = follow(followers, ws_base(service), did, service.tokens.user(1, ttl=-60))
    for follower, kind, reason in ((stranger, Forbidden, "forbidden"), (garbage, InvalidToken, "invalid_token"),
                                   (missing, DiagnosisNotFound, "diagnosis_not_found"),
                                   (expired, TokenExpired, "token_expired")):
        await follower.wait_ended()
        assert isinstance(follower.error, kind), follower.error
        assert follower.error.reason == reason
        assert follower.error.close_code == 1008
        assert follower.states[-1].state == "closed"
        assert [s.state for s in follower.states].count("connecting") == 1  # stopped, no retry


async def test_publisher_retries_a_lost_answer_and_it_is_broadcast_once(service: Service,
                                                                        followers: list[Follower]) -> None:
    uid, did = service.seed.owned()
    follower = follow(followers, ws_base(service), did, service.tokens.user(uid))
    await follower.wait(lambda f: f.lives() == 1, "live")
    proxy = LosingProxy(service.server.port or 0, lose=1)
    await proxy.start()
    try:
        async with Publisher(f"http://127.0.0.1:{proxy.port}", service.tokens.service(),
                             budget=RetryBudget(attempts=4, seconds=20, timeout=5)) as publisher:
            result = await publisher.publish(did, "lab_result", {"value": 7})
        assert proxy.lost_answers == 1
        assert proxy.connections == 2
        assert result["offset"] == 1
        await service.publish(did, "marker", {})
        await follower.wait_offsets([1, 2])
        assert [i["type"] for i in follower.items] == ["lab_result", "marker"]  # the retry was not broadcast
    finally:
        await proxy.close()


async def test_publisher_endpoints_and_typed_errors(service: Service) -> None:
    _uid, did = service.seed.owned()
    async with Publisher(service.base_url, service.tokens.service()) as rt:
        rec = await rt.broadcast_recommendation_update(did, {"herb": "mint"}, {"herb": "sage"}, "lab result")
        eff = await rt.broadcast_effectiveness_update(did, 5, 0.8, 0.9, 12, old_effectiveness=0.5, herb="sage")
        fb = await rt.broadcast_feedback_update(did, 9, 5, 0.7, comment="better")
        batch = await rt.publish_batch([{"diagnosis_id": did, "type": "a"}, {"diagnosis_id": did, "type": "b"}])
        assert [rec["offset"], eff["offset"], fb["offset"]] == [1, 2, 3]
        assert [r["offset"] for r in batch["results"]] == [4, 5]
        with pytest.raises(ValidationFailed) as bad:
            await rt.broadcast_feedback_update(did, 9, 7, 0.7)  # checked before it is sent
        assert "rating" in bad.value.fields
        with pytest.raises(DiagnosisNotFound) as unknown:
            await rt.publish(service.seed.unknown(), "note", {})
        assert unknown.value.status == 404
        await rt.publish(did, "note", {"a": 1}, idempotency_key="k-1")
        with pytest.raises(IdempotencyKeyReused) as reused:
            await rt.publish(did, "note", {"a": 2}, idempotency_key="k-1")
        assert reused.value.status == 422
    async with Publisher(service.base_url, service.tokens.user(service.seed.user())) as stranger:
        with pytest.raises(Forbidden) as forbidden:
            await stranger.publish(did, "note", {})
        assert (forbidden.value.status, forbidden.value.reason) == (403, "forbidden")
    async with Publisher(service.base_url, "not-a-jwt") as nobody:
        with pytest.raises(Unauthorized):
            await nobody.publish(did, "note", {})


async def test_publisher_gives_up_within_its_budget(service: Service) -> None:
    port = free_port()  # nobody listens here
    _uid, did = service.seed.owned()
    async with Publisher(f"http://127.0.0.1:{port}", service.tokens.service(),
                         budget=RetryBudget(attempts=3, seconds=5, timeout=1, backoff=FAST)) as rt:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ServiceUnavailable) as failed:
            await rt.publish(did, "note", {})
        assert loop.time() - started < 5
    assert "3 time(s)" in str(failed.value)


async def test_personal_messages_arrive_once_with_their_message_id(service: Service,
                                                                   followers: list[Follower]) -> None:
    uid, did = service.seed.owned()
    async with Publisher(service.base_url, service.tokens.service()) as rt:
        kept = await rt.publish(did, "nudge", {"n": 0}, user_id=uid)  # nobody connected: kept for the user
        assert kept["offset"] is None
        follower = follow(followers, ws_base(service), did, service.tokens.user(uid), device="py-personal")
        await follower.wait(lambda f: len(f.items) >= 1, "the kept personal message")
        await rt.publish(did, "nudge", {"n": 1}, user_id=uid)
        await rt.publish(did, "broadcast", {})
        await follower.wait(lambda f: len(f.items) >= 3, "three items")
    assert [(i["type"], i["data"]) for i in follower.items] == [
        ("nudge", {"n": 0}), ("nudge", {"n": 1}), ("broadcast", {})]
    ids = [i["message_id"] for i in follower.items[:2]]
    assert all(isinstance(i, str) and i for i in ids) and ids[0] != ids[1]
    assert "offset" not in follower.items[0]


async def test_an_upgrade_refused_with_retry_after_is_retried_no_sooner(start_service: StartService,
                                                                       followers: list[Follower]) -> None:
    """HTTP 429 before the upgrade (too many attempts from this address) carries Retry-After; the client waits
    at least that long, then gets in."""
    service = await start_service(connect_rate=0.5, connect_burst=1)
    uid, did = service.seed.owned()
    follower = follow(followers, ws_base(service), did, service.tokens.user(uid))
    await follower.wait(lambda f: f.lives() == 1, "live")
    second = follow(followers, ws_base(service), did, service.tokens.user(uid), device="second")
    await second.wait(lambda f: any(s.state == "reconnecting" for s in f.states), "a refused attempt")
    refused = next(s for s in second.states if s.state == "reconnecting")
    assert refused.reason == "http_429"
    assert refused.delay is not None and refused.delay >= 1.0  # Retry-After, though FAST backoff caps at 0.3 s
    await second.wait(lambda f: f.lives() == 1, "live after waiting", timeout=WAIT)


async def test_a_personal_message_sent_again_after_a_drop_is_handed_over_once(
        service: Service, followers: list[Follower]) -> None:
    """The service keeps a personal message until a connection confirms it; the first connection is cut right
    after it arrived, so the next one gets it again, and the client drops the repeat by its message_id."""
    uid, did = service.seed.owned()
    kept = await service.publish(did, "nudge", {"n": 1}, user_id=uid)
    assert kept["offset"] is None
    proxy = CuttingProxy(service.server.port or 0, b"reconnect_messages")
    await proxy.start()
    frames: list[dict[str, Any]] = []
    try:
        follower = follow(followers, f"ws://127.0.0.1:{proxy.port}", did, service.tokens.user(uid),
                          device="py-cut", on_frame=lambda direction, frame: frames.append(frame))
        await follower.wait(lambda f: f.lives() == 2, "the second connection")
        await service.publish(did, "marker", {})
        await follower.wait(lambda f: len(f.items) >= 2, "the marker")
    finally:
        await proxy.close()
    assert proxy.cut == 1
    replays = [f for f in frames if f.get("type") == "reconnect_messages"]
    sent = [m["message_id"] for r in replays for m in r["data"]["messages"]]
    assert len(sent) == 2 and sent[0] == sent[1]  # the service sent it twice...
    assert [i["type"] for i in follower.items] == ["nudge", "marker"]  # ...the application got it once


async def test_an_acknowledged_personal_message_is_not_sent_again(service: Service,
                                                                  followers: list[Follower]) -> None:
    """The client acks after handing over a personal message, so the service drops it from the inbox: the
    user's next connection (another process, another device) does not get it again."""
    uid, did = service.seed.owned()
    await service.publish(did, "nudge", {}, user_id=uid)  # kept: nobody is connected
    sent: list[dict[str, Any]] = []
    first = follow(followers, ws_base(service), did, service.tokens.user(uid), device="one",
                   on_frame=lambda direction, frame: sent.append(frame) if direction == "out" else None)
    await first.wait(lambda f: len(f.items) == 1 and any(s.get("type") == "ack" for s in sent), "the ack")
    await first.stop()
    second = follow(followers, ws_base(service), did, service.tokens.user(uid), device="two")
    await second.wait(lambda f: f.lives() == 1, "live")
    await service.publish(did, "marker", {})
    await second.wait(lambda f: len(f.items) >= 1, "the marker")
    assert [i["type"] for i in second.items] == ["marker"]
    assert [i["type"] for i in first.items] == ["nudge"]
