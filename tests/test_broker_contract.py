"""The Broker contract (broker/base.py), one suite for every implementation.

Each implementation is registered in BROKERS as a factory that builds a BrokerHarness: the broker under test, a way
to move its clock (so retention by age needs no sleeping), and a way to "restart" it. The memory broker runs
in-process; the Redis broker runs against a real redis-server (the session's `redis_url`), each test under a key
prefix of its own, with the broker's clock (the one its retention decisions read) moved by the test.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from realtime_service.broker.base import Broker, Publication
from realtime_service.broker.memory import MemoryBroker
from realtime_service.broker.redis import RedisBroker
from realtime_service.protocol import frames

HISTORY_SIZE = 5
HISTORY_TTL = 60.0
INBOX_SIZE = 3
IDEMPOTENCY_TTL = 600.0
HISTORY_MAX_BYTES = 4096
DID = 101
OTHER_DID = 202


class FakeClock:
    """Monotonic and wall time that only move when a test says so."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_time = 1_750_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_time

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_time += seconds


@dataclass
class BrokerHarness:
    """A broker under test and the levers the contract tests pull on it."""

    broker: Broker
    advance: Callable[[float], Awaitable[None]]  # let `seconds` of broker time pass
    restart: Callable[[], Awaitable[Broker]]  # a new instance as after a process restart
    restart_loses_history: bool  # memory: yes (so a new epoch); Redis: no (same epoch, offsets go on)
    received: list[Publication] = field(default_factory=list)


async def memory_harness(request: pytest.FixtureRequest) -> BrokerHarness:
    clock = FakeClock()

    def build() -> MemoryBroker:
        return MemoryBroker(HISTORY_SIZE, HISTORY_TTL, INBOX_SIZE, IDEMPOTENCY_TTL, clock=clock.monotonic,
                            wall=clock.wall, history_max_bytes=HISTORY_MAX_BYTES)

    async def advance(seconds: float) -> None:
        clock.advance(seconds)

    async def restart() -> Broker:
        fresh = build()
        await fresh.start()
        return fresh

    return BrokerHarness(build(), advance, restart, restart_loses_history=True)


async def redis_harness(request: pytest.FixtureRequest) -> BrokerHarness:
    url = request.getfixturevalue("redis_url")
    clock = FakeClock()
    prefix = f"contract-{uuid.uuid4().hex[:8]}"

    def build() -> RedisBroker:
        return RedisBroker(url, prefix=prefix, history_size=HISTORY_SIZE, history_max_bytes=HISTORY_MAX_BYTES,
                           history_ttl=HISTORY_TTL, inbox_size=INBOX_SIZE, idempotency_ttl=IDEMPOTENCY_TTL,
                           timeout=2.0, clock=clock.wall)

    async def advance(seconds: float) -> None:
        clock.advance(seconds)

    async def restart() -> Broker:
        fresh = build()
        await fresh.start()
        return fresh

    return BrokerHarness(build(), advance, restart, restart_loses_history=False)


BROKERS: list[tuple[str, Callable[[pytest.FixtureRequest], Awaitable[BrokerHarness]]]] = [
    ("memory", memory_harness), ("redis", redis_harness)]


@pytest.fixture(params=[factory for _name, factory in BROKERS], ids=[name for name, _factory in BROKERS])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[BrokerHarness]:
    built: BrokerHarness = await request.param(request)
    built.broker.set_handler(built.received.append)
    await built.broker.start()
    try:
        yield built
    finally:
        await built.broker.close()


@pytest.fixture
def broker(harness: BrokerHarness) -> Broker:
    return harness.broker


def body(n: int, did: int = DID) -> bytes:
    return frames.broadcast_body("test_event", did, {"n": n})


async def publish_many(broker: Broker, count: int, did: int = DID) -> list[Publication]:
    return [await broker.publish(did, body(i, did)) for i in range(1, count + 1)]


# -- offsets and epoch --------------------------------------------------------------------------------------


async def test_new_diagnosis_starts_at_offset_zero_with_a_stable_epoch(broker: Broker) -> None:
    first = await broker.position(DID)
    assert first.offset == 0
    assert isinstance(first.epoch, str)
    assert first.epoch
    assert await broker.position(DID) == first


async def test_publish_assigns_gapless_offsets_in_the_current_epoch(broker: Broker) -> None:
    epoch = (await broker.position(DID)).epoch
    pubs = await publish_many(broker, 4)
    assert [p.offset for p in pubs] == [1, 2, 3, 4]
    assert {p.epoch for p in pubs} == {epoch}
    assert await broker.position(DID) == type(await broker.position(DID))(4, epoch)


async def test_offsets_are_per_diagnosis(broker: Broker) -> None:
    await publish_many(broker, 3, DID)
    other = await publish_many(broker, 2, OTHER_DID)
    assert [p.offset for p in other] == [1, 2]
    assert (await broker.position(DID)).offset == 3


async def test_concurrent_publishes_never_share_an_offset(broker: Broker) -> None:
    pubs = await asyncio.gather(*(broker.publish(DID, body(i)) for i in range(50)))
    assert sorted(p.offset for p in pubs) == list(range(1, 51))


async def test_publication_frame_carries_body_offset_and_epoch(broker: Broker) -> None:
    pub = await broker.publish(DID, body(7), exclude_session="sess-1")
    decoded = json.loads(pub.frame)
    assert decoded["type"] == "test_event"
    assert decoded["data"] == {"n": 7}
    assert decoded["diagnosis_id"] == DID
    assert decoded["offset"] == pub.offset == 1
    assert decoded["epoch"] == pub.epoch
    assert pub.diagnosis_id == DID
    assert pub.exclude_session == "sess-1"


async def test_subscribed_handler_sees_every_publication_in_offset_order(harness: BrokerHarness) -> None:
    broker = harness.broker
    await broker.subscribe(DID)
    pubs = await publish_many(broker, 5)
    assert [p.offset for p in harness.received if p.diagnosis_id == DID] == [1, 2, 3, 4, 5]
    assert [p.frame for p in harness.received if p.diagnosis_id == DID] == [p.frame for p in pubs]
    await broker.unsubscribe(DID)


async def test_restart_changes_epoch_exactly_when_history_is_lost(harness: BrokerHarness) -> None:
    await publish_many(harness.broker, 3)
    before = await harness.broker.position(DID)
    fresh = await harness.restart()
    try:
        after = await fresh.position(DID)
        history = await fresh.history(DID, 0)
        if harness.restart_loses_history:
            assert after.epoch != before.epoch
            assert after.offset == 0
            assert history.publications == ()
            assert (await fresh.publish(DID, body(1))).offset == 1
        else:
            assert after == before
            assert [p.offset for p in history.publications] == [1, 2, 3]
            assert (await fresh.publish(DID, body(4))).offset == 4
    finally:
        await fresh.close()


async def test_ping_answers(broker: Broker) -> None:
    await broker.ping()


# -- history and retention ------------------------------------------------------------------------------------


async def test_history_returns_publications_after_since_in_order(broker: Broker) -> None:
    pubs = await publish_many(broker, 4)
    history = await broker.history(DID, 2)
    assert [p.offset for p in history.publications] == [3, 4]
    assert [p.frame for p in history.publications] == [p.frame for p in pubs[2:]]
    assert history.position == await broker.position(DID)
    assert history.oldest == 1
    assert (await broker.history(DID, 4)).publications == ()
    assert (await broker.history(DID, 9)).publications == ()


async def test_history_of_an_empty_stream(broker: Broker) -> None:
    history = await broker.history(DID, 0)
    assert history.publications == ()
    assert history.position.offset == 0
    assert history.oldest == 1  # position.offset + 1 when nothing is retained


async def test_retention_by_size_keeps_the_newest(broker: Broker) -> None:
    await publish_many(broker, HISTORY_SIZE + 3)
    history = await broker.history(DID, 0)
    assert [p.offset for p in history.publications] == list(range(4, HISTORY_SIZE + 4))
    assert history.oldest == 4
    assert [p.offset for p in (await broker.history(DID, 1)).publications] == list(range(4, HISTORY_SIZE + 4))
    assert await broker.retained_count() == HISTORY_SIZE


async def test_retention_by_age_drops_old_publications_but_keeps_the_epoch(harness: BrokerHarness) -> None:
    broker = harness.broker
    epoch = (await broker.position(DID)).epoch
    await publish_many(broker, 2)
    await harness.advance(HISTORY_TTL / 2)
    await broker.publish(DID, body(3))
    await harness.advance(HISTORY_TTL / 2 + 1)
    history = await broker.history(DID, 0)
    assert [p.offset for p in history.publications] == [3]
    assert history.oldest == 3
    assert await broker.retained_count() == 1
    await harness.advance(HISTORY_TTL)
    history = await broker.history(DID, 0)
    assert history.publications == ()
    assert history.oldest == history.position.offset + 1 == 4
    assert history.position.epoch == epoch  # expiry is retention, not lost history
    assert (await broker.publish(DID, body(4))).offset == 4
    assert await broker.retained_count() == 1


async def test_retained_count_spans_diagnoses(harness: BrokerHarness) -> None:
    await publish_many(harness.broker, 2, DID)
    await publish_many(harness.broker, HISTORY_SIZE + 1, OTHER_DID)
    assert await harness.broker.retained_count() == 2 + HISTORY_SIZE
    await harness.advance(HISTORY_TTL + 1)
    assert await harness.broker.retained_count() == 0


# -- cursors -------------------------------------------------------------------------------------------------


async def test_cursor_is_created_once_at_the_given_position(broker: Broker) -> None:
    assert await broker.cursor(DID, 7, "phone") is None
    await publish_many(broker, 3)
    position = await broker.position(DID)
    cursor = await broker.init_cursor(DID, 7, "phone", position)
    assert (cursor.user_id, cursor.device, cursor.offset, cursor.epoch) == (7, "phone", 3, position.epoch)
    await publish_many(broker, 2)
    again = await broker.init_cursor(DID, 7, "phone", await broker.position(DID))
    assert again.offset == 3
    assert await broker.cursor(DID, 7, "phone") == again


async def test_cursor_moves_forward_only_and_stamps_the_time(harness: BrokerHarness) -> None:
    broker = harness.broker
    position = await broker.position(DID)
    await broker.init_cursor(DID, 7, "phone", position)
    await broker.confirm(DID, 7, "phone", 4, position.epoch)
    first = await broker.cursor(DID, 7, "phone")
    assert first is not None
    assert first.offset == 4
    await harness.advance(5)
    await broker.confirm(DID, 7, "phone", 2, position.epoch)
    unchanged = await broker.cursor(DID, 7, "phone")
    assert unchanged is not None
    assert unchanged.offset == 4
    await broker.confirm(DID, 7, "phone", 6, position.epoch)
    moved = await broker.cursor(DID, 7, "phone")
    assert moved is not None
    assert moved.offset == 6
    assert moved.confirmed_at >= first.confirmed_at + 5 - 0.5


async def test_cursors_are_per_user_device_and_diagnosis(broker: Broker) -> None:
    position = await broker.position(DID)
    for user, device in [(7, "phone"), (7, "tab"), (8, "phone")]:
        await broker.init_cursor(DID, user, device, position)
    await broker.confirm(DID, 7, "phone", 3, position.epoch)
    listed = {(c.user_id, c.device): c.offset for c in await broker.cursors(DID)}
    assert listed == {(7, "phone"): 3, (7, "tab"): 0, (8, "phone"): 0}
    assert await broker.cursors(OTHER_DID) == []
    assert await broker.cursor(OTHER_DID, 7, "phone") is None


async def test_reset_cursor_sets_the_position(broker: Broker) -> None:
    position = await broker.position(DID)
    await broker.init_cursor(DID, 7, "phone", position)
    await broker.confirm(DID, 7, "phone", 9, position.epoch)
    await publish_many(broker, 2)
    await broker.reset_cursor(DID, 7, "phone", await broker.position(DID))
    cursor = await broker.cursor(DID, 7, "phone")
    assert cursor is not None
    assert (cursor.offset, cursor.epoch) == (2, position.epoch)


# -- personal inboxes ------------------------------------------------------------------------------------------


async def test_kept_personal_messages_stay_until_dropped_oldest_first(broker: Broker) -> None:
    await broker.push_personal(DID, 7, "m1", b'{"n":1}')
    await broker.push_personal(DID, 7, "m2", b'{"n":2}')
    assert await broker.kept_personal(DID, 7) == [("m1", b'{"n":1}'), ("m2", b'{"n":2}')]
    # sent to a connection that died before confirming: still there for the next one
    assert await broker.kept_personal(DID, 7) == [("m1", b'{"n":1}'), ("m2", b'{"n":2}')]
    await broker.drop_personal(DID, 7, ["m1"])
    assert await broker.kept_personal(DID, 7) == [("m2", b'{"n":2}')]
    await broker.drop_personal(DID, 7, ["m2", "unknown"])
    assert await broker.kept_personal(DID, 7) == []


async def test_personal_inbox_is_per_user_and_diagnosis(broker: Broker) -> None:
    await broker.push_personal(DID, 7, "a", b"a")
    await broker.push_personal(DID, 8, "b", b"b")
    await broker.push_personal(OTHER_DID, 7, "c", b"c")
    assert await broker.kept_personal(DID, 8) == [("b", b"b")]
    assert await broker.kept_personal(OTHER_DID, 7) == [("c", b"c")]
    await broker.drop_personal(DID, 7, ["b", "c"])  # ids of other inboxes drop nothing here
    assert await broker.kept_personal(DID, 7) == [("a", b"a")]


async def test_personal_inbox_is_bounded_dropping_the_oldest(broker: Broker) -> None:
    for n in range(INBOX_SIZE + 2):
        await broker.push_personal(DID, 7, f"m{n}", b"%d" % n)
    assert await broker.kept_personal(DID, 7) == [(f"m{n}", b"%d" % n) for n in range(2, INBOX_SIZE + 2)]


async def test_personal_messages_expire_with_history_ttl(harness: BrokerHarness) -> None:
    broker = harness.broker
    await broker.push_personal(DID, 7, "old", b"old")
    await harness.advance(HISTORY_TTL / 2)
    await broker.push_personal(DID, 7, "new", b"new")
    await harness.advance(HISTORY_TTL / 2 + 1)
    assert await broker.kept_personal(DID, 7) == [("new", b"new")]


# -- idempotency ------------------------------------------------------------------------------------------------


async def test_idempotency_key_is_reserved_once_then_answers_with_the_stored_result(broker: Broker) -> None:
    assert await broker.reserve_idempotency("service:main-api", "k1", "fp", "owner-1", 15.0) is None
    pending = await broker.reserve_idempotency("service:main-api", "k1", "fp", "owner-2", 15.0)
    assert pending is not None
    assert (pending.done, pending.fingerprint) == (False, "fp")
    await broker.complete_idempotency("service:main-api", "k1", "owner-1", b'{"offset":1}')
    done = await broker.reserve_idempotency("service:main-api", "k1", "fp", "owner-3", 15.0)
    assert done is not None
    assert (done.done, done.fingerprint, done.result) == (True, "fp", b'{"offset":1}')
    assert await broker.reserve_idempotency("service:other", "k1", "fp", "owner-4", 15.0) is None
    assert await broker.reserve_idempotency("service:main-api", "k2", "fp", "owner-5", 15.0) is None


async def test_concurrent_reservations_of_one_key_admit_exactly_one(broker: Broker) -> None:
    answers = await asyncio.gather(*(broker.reserve_idempotency("service:a", "same", "fp", f"owner-{i}", 15.0)
                                     for i in range(20)))
    assert sum(answer is None for answer in answers) == 1


async def test_a_released_reservation_lets_a_retry_publish(broker: Broker) -> None:
    assert await broker.reserve_idempotency("service:a", "k", "fp", "first", 15.0) is None
    await broker.release_idempotency("service:a", "k", "someone-else")  # not theirs: ignored
    assert await broker.reserve_idempotency("service:a", "k", "fp", "second", 15.0) is not None
    await broker.release_idempotency("service:a", "k", "first")
    assert await broker.reserve_idempotency("service:a", "k", "fp", "second", 15.0) is None


async def test_a_pending_reservation_lapses_after_its_lease(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert await broker.reserve_idempotency("service:a", "k", "fp", "dead-node", 15.0) is None
    await harness.advance(16)
    assert await broker.reserve_idempotency("service:a", "k", "fp", "retry", 15.0) is None


async def test_idempotent_result_lives_for_the_ttl(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert await broker.reserve_idempotency("service:a", "k", "fp", "owner", 15.0) is None
    await broker.complete_idempotency("service:a", "k", "owner", b"first")
    await harness.advance(IDEMPOTENCY_TTL - 1)
    held = await broker.reserve_idempotency("service:a", "k", "fp", "again", 15.0)
    assert held is not None
    assert held.result == b"first"
    await harness.advance(2)
    assert await broker.reserve_idempotency("service:a", "k", "fp", "later", 15.0) is None


# -- history bounded in bytes ----------------------------------------------------------------------------------


async def test_history_is_bounded_in_bytes_oldest_first(broker: Broker) -> None:
    big = frames.broadcast_body("test_event", DID, {"pad": "x" * 1500})
    pubs = [await broker.publish(DID, big) for _ in range(4)]
    history = await broker.history(DID, 0)
    kept = [p.offset for p in history.publications]
    assert kept == [3, 4]  # two frames of ~1.6 KB fit in 4 KB, three do not
    assert sum(len(p.frame) for p in history.publications) <= HISTORY_MAX_BYTES
    assert history.oldest == 3
    assert [p.frame for p in history.publications] == [p.frame for p in pubs[2:]]


async def test_memory_sweep_frees_expired_history_and_inboxes_without_losing_the_position() -> None:
    """A diagnosis nobody touches again still loses its expired history and inboxes, but keeps offset and epoch."""
    now = [1000.0]
    broker = MemoryBroker(HISTORY_SIZE, HISTORY_TTL, INBOX_SIZE, IDEMPOTENCY_TTL, clock=lambda: now[0])
    for i in range(3):
        await broker.publish(7, b'{"i":%d}' % i)
    await broker.push_personal(7, 42, "m", b'{"personal":true}')
    before = await broker.position(7)
    now[0] += HISTORY_TTL + 1
    broker.sweep()
    assert broker._retained == 0
    assert broker._inboxes == {}
    assert await broker.position(7) == before
    history = await broker.history(7, 0)
    assert history.publications == ()
    assert history.oldest == before.offset + 1
