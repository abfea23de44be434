"""The pure parts, without sockets: session state machine, rate limit, frames, changes, REST models, outbox,
connection + hub over a fake Transport, and the ownership cache over a fake source."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from realtime_service.auth.ownership import OwnershipChecker
from realtime_service.auth.tokens import Principal
from realtime_service.connection import Connection
from realtime_service.connection import Phase as ConnPhase
from realtime_service.errors import CloseReason, DiagnosisNotFound, Forbidden, OwnershipUnavailable
from realtime_service.hub import Hub
from realtime_service.outbox import PING, Outbox
from realtime_service.protocol import frames
from realtime_service.protocol.changes import changed_fields
from realtime_service.protocol.models import (
    BatchRequest,
    EffectivenessUpdateRequest,
    FeedbackUpdateRequest,
    PublishRequest,
    RecommendationUpdateRequest,
    RevokeRequest,
    field_errors,
)
from realtime_service.protocol.ratelimit import TokenBucket
from realtime_service.protocol.session import (
    Ack,
    Authenticate,
    Close,
    Phase,
    Ping,
    Refresh,
    Reject,
    ResumeRequest,
    Session,
)

TOKEN = "header.payload.signature"
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def dumps(obj: Any) -> str:
    return json.dumps(obj)


def fresh_session(authenticated: bool = False, rate: float = 20, burst: int = 40) -> Session:
    return Session(rate, burst, now=0.0, authenticated_by_request=authenticated)


# -- Session: the auth phase -----------------------------------------------------------------------------

BAD_FIRST_FRAMES: list[tuple[str, str | bytes, bool]] = [
    ("binary", b'{"type": "auth", "token": "x.y.z"}', True),
    ("invalid json", "{not json", False),
    ("empty text", "", False),
    ("json array", dumps([{"type": "auth", "token": TOKEN}]), False),
    ("json string", dumps("auth"), False),
    ("json null", "null", False),
    ("ping first", dumps({"type": "ping"}), False),
    ("ack first", dumps({"type": "ack", "offset": 1}), False),
    ("no type", dumps({"token": TOKEN}), False),
    ("type not a string", dumps({"type": 1, "token": TOKEN}), False),
    ("AUTH uppercase", dumps({"type": "AUTH", "token": TOKEN}), False),
    ("auth without token", dumps({"type": "auth"}), False),
    ("auth empty token", dumps({"type": "auth", "token": ""}), False),
    ("auth null token", dumps({"type": "auth", "token": None}), False),
    ("auth numeric token", dumps({"type": "auth", "token": 123}), False),
    ("auth list token", dumps({"type": "auth", "token": [TOKEN]}), False),
    ("negative since", dumps({"type": "auth", "token": TOKEN, "since": -1}), False),
    ("float since", dumps({"type": "auth", "token": TOKEN, "since": 1.5}), False),
    ("bool since", dumps({"type": "auth", "token": TOKEN, "since": True}), False),
    ("word since", dumps({"type": "auth", "token": TOKEN, "since": "ten"}), False),
    ("superscript-digit since", dumps({"type": "auth", "token": TOKEN, "since": "\u00b2"}), False),
    ("numeric epoch", dumps({"type": "auth", "token": TOKEN, "epoch": 5}), False),
    ("device too long", dumps({"type": "auth", "token": TOKEN, "device": "d" * 129}), False),
    ("device not a string", dumps({"type": "auth", "token": TOKEN, "device": 7}), False),
    ("device with newline", dumps({"type": "auth", "token": TOKEN, "device": "a\nb"}), False),
]


@pytest.mark.parametrize(("payload", "binary"), [(p, b) for _, p, b in BAD_FIRST_FRAMES],
                         ids=[name for name, _, _ in BAD_FIRST_FRAMES])
def test_every_bad_first_frame_closes_invalid_token(payload: str | bytes, binary: bool) -> None:
    session = fresh_session()
    assert session.phase is Phase.AWAITING_AUTH
    assert session.receive(payload, binary, now=0.0) == Close(CloseReason.INVALID_TOKEN)


GOOD_AUTH_FRAMES: list[tuple[dict[str, Any], ResumeRequest]] = [
    ({"type": "auth", "token": TOKEN}, ResumeRequest(None, None, "default")),
    ({"type": "auth", "token": TOKEN, "since": 17, "epoch": "ep-1"}, ResumeRequest(17, "ep-1", "default")),
    ({"type": "auth", "token": TOKEN, "since": 0, "epoch": "e"}, ResumeRequest(0, "e", "default")),
    ({"type": "auth", "token": TOKEN, "since": "42", "epoch": "e"}, ResumeRequest(42, "e", "default")),
    ({"type": "auth", "token": TOKEN, "device": "phone-1"}, ResumeRequest(None, None, "phone-1")),
    ({"type": "auth", "token": TOKEN, "device": ""}, ResumeRequest(None, None, "default")),
    ({"type": "auth", "token": TOKEN, "device": "d" * 128}, ResumeRequest(None, None, "d" * 128)),
    ({"type": "auth", "token": TOKEN, "since": 3, "epoch": "x", "device": "tab"}, ResumeRequest(3, "x", "tab")),
]


@pytest.mark.parametrize(("frame", "resume"), GOOD_AUTH_FRAMES)
def test_good_auth_frame_parses_token_and_resume_fields(frame: dict[str, Any], resume: ResumeRequest) -> None:
    session = fresh_session()
    action = session.receive(dumps(frame), False, now=0.0)
    assert isinstance(action, Authenticate)
    assert (action.token, action.resume) == (TOKEN, resume)
    assert action.given == {k for k in ("since", "epoch", "device") if frame.get(k) not in (None, "")}


def test_session_authenticated_by_request_skips_auth_phase() -> None:
    session = fresh_session(authenticated=True)
    assert session.phase is Phase.OPEN
    assert session.receive(dumps({"type": "ping"}), False, now=0.0) == Ping()


def test_opened_session_no_longer_expects_auth_and_closed_one_ignores_frames() -> None:
    session = fresh_session()
    assert isinstance(session.receive(dumps({"type": "auth", "token": TOKEN}), False, 0.0), Authenticate)
    session.opened()
    assert session.receive(dumps({"type": "ping"}), False, 0.0) == Ping()
    session.closed()
    assert isinstance(session.receive(dumps({"type": "ping"}), False, 0.0), Close)


# -- Session: after auth -----------------------------------------------------------------------------------

AFTER_AUTH: list[tuple[str, str | bytes, bool, Any]] = [
    ("ping", dumps({"type": "ping"}), False, Ping()),
    ("ping with extra", dumps({"type": "ping", "id": 9}), False, Ping()),
    ("ack", dumps({"type": "ack", "offset": 5}), False, Ack(5)),
    ("ack zero", dumps({"type": "ack", "offset": 0}), False, Ack(0)),
    ("ack big", dumps({"type": "ack", "offset": 2**40}), False, Ack(2**40)),
    ("ack missing offset", dumps({"type": "ack"}), False, "invalid_ack"),
    ("ack null offset", dumps({"type": "ack", "offset": None}), False, "invalid_ack"),
    ("ack string offset", dumps({"type": "ack", "offset": "5"}), False, "invalid_ack"),
    ("ack float offset", dumps({"type": "ack", "offset": 5.5}), False, "invalid_ack"),
    ("ack bool offset", dumps({"type": "ack", "offset": True}), False, "invalid_ack"),
    ("ack negative offset", dumps({"type": "ack", "offset": -1}), False, "invalid_ack"),
    ("refresh", dumps({"type": "auth", "token": "new.to.ken"}), False, Refresh("new.to.ken")),
    ("refresh without token", dumps({"type": "auth"}), False, Close(CloseReason.INVALID_TOKEN)),
    ("refresh numeric token", dumps({"type": "auth", "token": 1}), False, Close(CloseReason.INVALID_TOKEN)),
    ("unknown type", dumps({"type": "subscribe"}), False, "unknown_type"),
    ("missing type", dumps({"offset": 1}), False, "missing_type"),
    ("numeric type", dumps({"type": 3}), False, "missing_type"),
    ("array", dumps([{"type": "ping"}]), False, "invalid_frame"),
    ("number", "42", False, "invalid_frame"),
    ("invalid json", "{'type': 'ping'}", False, "invalid_json"),
    ("empty text", "", False, "invalid_json"),
    ("binary", b'{"type": "ping"}', True, "binary_frame"),
]


@pytest.mark.parametrize(("payload", "binary", "expected"), [(p, b, e) for _, p, b, e in AFTER_AUTH],
                         ids=[name for name, *_ in AFTER_AUTH])
def test_frames_after_auth_map_to_actions(payload: str | bytes, binary: bool, expected: Any) -> None:
    session = fresh_session(authenticated=True)
    action = session.receive(payload, binary, now=0.0)
    if isinstance(expected, str):
        assert isinstance(action, Reject), action
        assert action.code == expected
        assert action.message
    else:
        assert action == expected
    assert session.phase is Phase.OPEN  # a bad frame never ends the session by itself


def test_unknown_type_message_is_bounded() -> None:
    action = fresh_session(authenticated=True).receive(dumps({"type": "x" * 10_000}), False, 0.0)
    assert isinstance(action, Reject)
    assert len(action.message) < 200


# -- Session and TokenBucket: rate limit ------------------------------------------------------------------

@pytest.mark.parametrize("authenticated", [True, False])
def test_burst_of_40_then_rate_limited(authenticated: bool) -> None:
    session = fresh_session(authenticated=authenticated)
    if not authenticated:
        assert isinstance(session.receive(dumps({"type": "auth", "token": TOKEN}), False, 0.0), Authenticate)
        session.opened()
    used = 0 if authenticated else 1
    for _ in range(40 - used):
        assert session.receive(dumps({"type": "ping"}), False, now=0.0) == Ping()
    assert session.receive(dumps({"type": "ping"}), False, now=0.0) == Close(CloseReason.RATE_LIMITED)
    assert isinstance(session.receive(dumps({"type": "ping"}), False, now=60.0), Close)  # stays closed


def test_rate_limit_counts_bad_frames_too() -> None:
    session = fresh_session(authenticated=True, burst=3)
    for _ in range(3):
        assert isinstance(session.receive(b"\x00", True, now=0.0), Reject)
    assert session.receive(b"\x00", True, now=0.0) == Close(CloseReason.RATE_LIMITED)


def test_rate_limit_refills_at_rate_with_injected_clock() -> None:
    session = fresh_session(authenticated=True, rate=20, burst=40)
    ping = dumps({"type": "ping"})
    for _ in range(40):
        assert session.receive(ping, False, now=100.0) == Ping()
    # half a second later: 10 frames' worth came back, not more
    for _ in range(10):
        assert session.receive(ping, False, now=100.5) == Ping()
    assert session.receive(ping, False, now=100.5) == Close(CloseReason.RATE_LIMITED)


def test_token_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=20, burst=40, now=0.0)
    assert [bucket.take(0.0) for _ in range(41)] == [True] * 40 + [False]
    assert [bucket.take(0.5) for _ in range(11)] == [True] * 10 + [False]
    assert [bucket.take(0.75) for _ in range(6)] == [True] * 5 + [False]


def test_sustained_rate_just_under_the_limit_is_never_limited() -> None:
    session = fresh_session(authenticated=True, rate=20, burst=40)
    ping = dumps({"type": "ping"})
    for i in range(19 * 30):  # 30 seconds at 19 frames/s
        assert session.receive(ping, False, now=i / 19) == Ping(), i


def test_token_bucket_never_exceeds_burst_after_a_long_idle() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.take(0.0) for _ in range(5))
    assert not bucket.take(0.0)
    assert [bucket.take(3600.0) for _ in range(6)] == [True] * 5 + [False]


def test_token_bucket_clock_going_backwards_grants_nothing() -> None:
    bucket = TokenBucket(rate=4, burst=2, now=10.0)
    assert bucket.take(10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.take(10.25)  # a quarter second after the last real stamp: one token
    assert not bucket.take(10.25)


# -- frames --------------------------------------------------------------------------------------------

def test_with_position_yields_json_with_offset_and_epoch() -> None:
    body = frames.broadcast_body("herb_update", 12, {"herb": "mint", "nested": {"a": [1, 2]}})
    for epoch in ["abc", 'quo"te', "ünïcode", "back\\slash"]:
        frame = json.loads(frames.with_position(body, 17, epoch))
        assert frame["type"] == "herb_update"
        assert frame["diagnosis_id"] == 12
        assert frame["data"] == {"herb": "mint", "nested": {"a": [1, 2]}}
        assert frame["offset"] == 17
        assert frame["epoch"] == epoch
        assert ISO_UTC.match(frame["timestamp"])


def test_reconnect_frame_embeds_encoded_frames_and_parses() -> None:
    msgs = [frames.with_position(frames.broadcast_body("t", 5, {"i": i}), i, "ep") for i in (3, 4, 5)]
    for recovered in (True, False):
        frame = json.loads(frames.reconnect_frame(5, msgs, recovered))
        assert frame["type"] == "reconnect_messages"
        assert frame["diagnosis_id"] == 5
        assert frame["data"]["recovered"] is recovered
        assert [m["offset"] for m in frame["data"]["messages"]] == [3, 4, 5]
        assert [m["data"] for m in frame["data"]["messages"]] == [{"i": 3}, {"i": 4}, {"i": 5}]
        assert ISO_UTC.match(frame["timestamp"])
    empty = json.loads(frames.reconnect_frame(5, [], False))
    assert empty["data"] == {"messages": [], "recovered": False}


def test_all_frames_have_type_diagnosis_data_timestamp_in_utc() -> None:
    built = {
        "connect": frames.connect_frame(9, 4, "s-1", 3, "ep"),
        "pong": frames.pong_frame(9),
        "error": frames.error_frame(9, "invalid_json", "bad"),
        "personal": frames.personal_frame("note", 9, 4, {"x": 1}),
        "broadcast": frames.broadcast_body("t", 9, {}),
    }
    now = datetime.now(UTC)
    for name, raw in built.items():
        frame = json.loads(raw)
        assert {"type", "diagnosis_id", "data", "timestamp"} <= set(frame), name
        assert frame["diagnosis_id"] == 9
        assert ISO_UTC.match(frame["timestamp"]), frame["timestamp"]
        stamp = datetime.fromisoformat(frame["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == timedelta(0)
        assert abs(stamp - now) < timedelta(seconds=5)
    connect = json.loads(built["connect"])
    assert connect["data"] == {"user_id": 4, "session": "s-1", "offset": 3, "epoch": "ep",
                               "message": "Successfully connected to diagnosis updates"}
    assert ISO_UTC.match(json.loads(built["pong"])["data"]["timestamp"])
    personal = json.loads(built["personal"])
    assert personal["user_id"] == 4
    assert "offset" not in personal


# -- changed_fields ------------------------------------------------------------------------------------

CHANGES: list[tuple[str, dict[str, Any], dict[str, Any], list[str]]] = [
    ("identical", {"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}, []),
    ("both empty", {}, {}, []),
    ("changed", {"a": 1, "b": 2}, {"a": 1, "b": 3}, ["b"]),
    ("added", {"a": 1}, {"a": 1, "z": None}, ["z"]),
    ("removed", {"a": 1, "m": None}, {"a": 1}, ["m"]),
    ("nested deep change", {"n": {"x": {"y": [1, {"z": 1}]}}}, {"n": {"x": {"y": [1, {"z": 2}]}}}, ["n"]),
    ("nested key order only", {"n": {"x": 1, "y": 2}}, {"n": {"y": 2, "x": 1}}, []),
    ("list order matters", {"l": [1, 2]}, {"l": [2, 1]}, ["l"]),
    ("int vs float", {"v": 1}, {"v": 1.0}, ["v"]),
    ("int vs true", {"v": 1}, {"v": True}, ["v"]),
    ("float vs true", {"v": 1.0}, {"v": True}, ["v"]),
    ("zero vs false", {"v": 0}, {"v": False}, ["v"]),
    ("null vs missing-in-nested", {"n": {"a": None}}, {"n": {}}, ["n"]),
    ("sorted", {"z": 1, "a": 1, "m": 1}, {"z": 2, "a": 2, "m": 2, "b": 0}, ["a", "b", "m", "z"]),
]


@pytest.mark.parametrize(("old", "new", "expected"), [(o, n, e) for _, o, n, e in CHANGES],
                         ids=[name for name, *_ in CHANGES])
def test_changed_fields(old: dict[str, Any], new: dict[str, Any], expected: list[str]) -> None:
    assert changed_fields(old, new) == expected


# -- REST models ---------------------------------------------------------------------------------------

def _errors(model: Any, body: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return field_errors(info.value.errors(include_url=False))  # type: ignore[arg-type]


EFF = {"diagnosis_id": 1, "recommendation_id": 2, "new_effectiveness": 0.5, "confidence": 0.9, "sample_size": 3}
FEED = {"diagnosis_id": 1, "feedback_id": 2, "rating": 4, "effectiveness": 0.5}
REC = {"diagnosis_id": 1, "old_data": {"a": 1}, "new_data": {"a": 2}, "reason": "r"}
PUB = {"diagnosis_id": 1, "type": "herb_update", "data": {"x": 1}}

VALID: list[tuple[str, Any, dict[str, Any]]] = [
    ("effectiveness bounds 0", EffectivenessUpdateRequest, {**EFF, "new_effectiveness": 0, "confidence": 0}),
    ("effectiveness bounds 1", EffectivenessUpdateRequest, {**EFF, "new_effectiveness": 1, "confidence": 1.0}),
    ("effectiveness optional", EffectivenessUpdateRequest, {**EFF, "old_effectiveness": 0.25, "herb": "mint"}),
    ("sample size 0", EffectivenessUpdateRequest, {**EFF, "sample_size": 0}),
    ("rating 1", FeedbackUpdateRequest, {**FEED, "rating": 1}),
    ("rating 5", FeedbackUpdateRequest, {**FEED, "rating": 5, "recommendation_id": 3, "comment": "ok"}),
    ("recommendation", RecommendationUpdateRequest, REC),
    ("publish", PublishRequest, PUB),
    ("publish type 64 chars", PublishRequest, {**PUB, "type": "a" + "b_9" * 21}),
    ("publish personal", PublishRequest, {**PUB, "user_id": 7, "exclude_session": "s"}),
    ("publish max id", PublishRequest, {**PUB, "diagnosis_id": 2**63 - 1}),
    ("revoke all", RevokeRequest, {}),
    ("revoke one", RevokeRequest, {"user_id": 3}),
]


@pytest.mark.parametrize(("model", "body"), [(m, b) for _, m, b in VALID], ids=[n for n, *_ in VALID])
def test_valid_bodies_are_accepted(model: Any, body: dict[str, Any]) -> None:
    model.model_validate(body)


INVALID: list[tuple[str, Any, dict[str, Any], str]] = [
    ("rating 3.5", FeedbackUpdateRequest, {**FEED, "rating": 3.5}, "rating"),
    ("rating 0", FeedbackUpdateRequest, {**FEED, "rating": 0}, "rating"),
    ("rating 6", FeedbackUpdateRequest, {**FEED, "rating": 6}, "rating"),
    ("rating string", FeedbackUpdateRequest, {**FEED, "rating": "4"}, "rating"),
    ("rating bool", FeedbackUpdateRequest, {**FEED, "rating": True}, "rating"),
    ("effectiveness > 1", FeedbackUpdateRequest, {**FEED, "effectiveness": 1.01}, "effectiveness"),
    ("effectiveness < 0", FeedbackUpdateRequest, {**FEED, "effectiveness": -0.1}, "effectiveness"),
    ("effectiveness bool", FeedbackUpdateRequest, {**FEED, "effectiveness": True}, "effectiveness"),
    ("effectiveness string", FeedbackUpdateRequest, {**FEED, "effectiveness": "0.5"}, "effectiveness"),
    ("feedback id 0", FeedbackUpdateRequest, {**FEED, "feedback_id": 0}, "feedback_id"),
    ("feedback id float", FeedbackUpdateRequest, {**FEED, "feedback_id": 2.0}, "feedback_id"),
    ("comment number", FeedbackUpdateRequest, {**FEED, "comment": 5}, "comment"),
    ("new effectiveness 2", EffectivenessUpdateRequest, {**EFF, "new_effectiveness": 2}, "new_effectiveness"),
    ("confidence bool", EffectivenessUpdateRequest, {**EFF, "confidence": False}, "confidence"),
    ("old effectiveness -1", EffectivenessUpdateRequest, {**EFF, "old_effectiveness": -1}, "old_effectiveness"),
    ("sample size -1", EffectivenessUpdateRequest, {**EFF, "sample_size": -1}, "sample_size"),
    ("sample size 2.5", EffectivenessUpdateRequest, {**EFF, "sample_size": 2.5}, "sample_size"),
    ("sample size bool", EffectivenessUpdateRequest, {**EFF, "sample_size": True}, "sample_size"),
    ("recommendation id -3", EffectivenessUpdateRequest, {**EFF, "recommendation_id": -3}, "recommendation_id"),
    ("missing confidence", EffectivenessUpdateRequest,
     {k: v for k, v in EFF.items() if k != "confidence"}, "confidence"),
    ("old_data list", RecommendationUpdateRequest, {**REC, "old_data": [1]}, "old_data"),
    ("reason missing", RecommendationUpdateRequest, {k: v for k, v in REC.items() if k != "reason"}, "reason"),
    ("diagnosis id 0", PublishRequest, {**PUB, "diagnosis_id": 0}, "diagnosis_id"),
    ("diagnosis id bool", PublishRequest, {**PUB, "diagnosis_id": True}, "diagnosis_id"),
    ("diagnosis id string", PublishRequest, {**PUB, "diagnosis_id": "1"}, "diagnosis_id"),
    ("diagnosis id too big", PublishRequest, {**PUB, "diagnosis_id": 2**63}, "diagnosis_id"),
    ("user id 0", PublishRequest, {**PUB, "user_id": 0}, "user_id"),
    ("type uppercase", PublishRequest, {**PUB, "type": "Herb"}, "type"),
    ("type digit first", PublishRequest, {**PUB, "type": "1herb"}, "type"),
    ("type dash", PublishRequest, {**PUB, "type": "herb-update"}, "type"),
    ("type empty", PublishRequest, {**PUB, "type": ""}, "type"),
    ("type 65 chars", PublishRequest, {**PUB, "type": "a" * 65}, "type"),
    ("type trailing newline", PublishRequest, {**PUB, "type": "herb\n"}, "type"),
    ("type number", PublishRequest, {**PUB, "type": 5}, "type"),
    ("unknown field", PublishRequest, {**PUB, "extra": 1}, "extra"),
    ("exclude_session number", PublishRequest, {**PUB, "exclude_session": 5}, "exclude_session"),
    ("revoke user 0", RevokeRequest, {"user_id": 0}, "user_id"),
]


@pytest.mark.parametrize(("model", "body", "field"), [(m, b, f) for _, m, b, f in INVALID],
                         ids=[n for n, *_ in INVALID])
def test_invalid_bodies_name_the_failing_field(model: Any, body: dict[str, Any], field: str) -> None:
    assert list(_errors(model, body)) == [field]


@pytest.mark.parametrize("reserved", ["connect", "pong", "reconnect_messages", "error", "auth", "ping"])
def test_reserved_types_are_refused(reserved: str) -> None:
    fields = _errors(PublishRequest, {**PUB, "type": reserved})
    assert list(fields) == ["type"]
    assert "reserved" in fields["type"]


def test_effectiveness_improvement_is_new_minus_old() -> None:
    data = EffectivenessUpdateRequest.model_validate({**EFF, "new_effectiveness": 0.7, "old_effectiveness": 0.4,
                                                      "herb": "mint"}).frame_data()
    assert data["improvement"] == pytest.approx(0.3)
    assert data["herb"] == "mint"
    assert data["old_effectiveness"] == 0.4
    plain = EffectivenessUpdateRequest.model_validate(EFF).frame_data()
    assert set(plain) == {"recommendation_id", "new_effectiveness", "confidence", "sample_size"}


def test_recommendation_frame_data_lists_changed_fields() -> None:
    body = RecommendationUpdateRequest.model_validate(
        {**REC, "old_data": {"dose": 1, "herb": "mint"}, "new_data": {"dose": 1.0, "note": "x"}})
    assert body.frame_data()["changed_fields"] == ["dose", "herb", "note"]


def test_batch_allows_1000_and_refuses_1001() -> None:
    assert len(BatchRequest.model_validate({"messages": [PUB] * 1000}).messages) == 1000
    fields = _errors(BatchRequest, {"messages": [PUB] * 1001})
    assert list(fields) == ["messages"]


def test_batch_field_errors_name_the_message_and_field() -> None:
    messages = [PUB, PUB, {**PUB, "type": "Bad"}, PUB, {**PUB, "diagnosis_id": -1}, {**PUB, "user_id": True}]
    fields = _errors(BatchRequest, {"messages": messages})
    assert set(fields) == {"messages.2.type", "messages.4.diagnosis_id", "messages.5.user_id"}
    assert set(_errors(BatchRequest, {"messages": [PUB, 7]})) == {"messages.1"}


def test_union_number_errors_name_the_field_not_the_union_member() -> None:
    fields = _errors(EffectivenessUpdateRequest, {**EFF, "confidence": "high", "new_effectiveness": None})
    assert set(fields) == {"confidence", "new_effectiveness"}


# -- Outbox --------------------------------------------------------------------------------------------

def test_outbox_limit_in_messages() -> None:
    box = Outbox(max_bytes=10_000, max_messages=3)
    assert [box.offer(b"x", i) for i in range(4)] == [True, True, True, False]
    assert len(box) == 3
    assert box.bytes == 3
    assert [box.pop() for _ in range(3)] == [(b"x", 0), (b"x", 1), (b"x", 2)]
    assert not box
    assert box.bytes == 0


def test_outbox_limit_in_bytes_queues_nothing_on_refusal() -> None:
    box = Outbox(max_bytes=10, max_messages=100)
    assert box.offer(b"123456")
    assert not box.offer(b"12345")  # 11 > 10
    assert len(box) == 1
    assert box.bytes == 6
    assert box.offer(b"1234")  # exactly 10
    assert box.bytes == 10
    assert not box.offer(b"1")
    assert [box.pop()[0] for _ in range(2)] == [b"123456", b"1234"]
    assert not box.offer(b"x" * 11)  # bigger than the whole outbox


def test_outbox_force_ignores_limits_and_counts_bytes() -> None:
    box = Outbox(max_bytes=4, max_messages=1)
    box.force(b"connect-frame")
    box.force(b"replay")
    assert len(box) == 2
    assert box.bytes == len(b"connect-frame") + len(b"replay")
    assert not box.offer(b"x")
    box.clear()
    assert not box
    assert box.bytes == 0
    assert box.offer(b"x")


def test_outbox_ping_marker_queues_in_order_without_bytes() -> None:
    box = Outbox(max_bytes=100, max_messages=100)
    box.offer(b"a", 1)
    box.ping()
    box.offer(b"b", 2)
    assert box.bytes == 2
    assert box.pop() == (b"a", 1)
    frame, offset = box.pop()
    assert frame is PING
    assert offset is None
    assert box.pop() == (b"b", 2)


# -- Connection and Hub with a fake Transport --------------------------------------------------------------

class FakeTransport:
    """Records wakes and closes."""

    def __init__(self) -> None:
        self.wakes = 0
        self.closes: list[CloseReason] = []

    def wake(self) -> None:
        self.wakes += 1

    def close(self, reason: CloseReason) -> None:
        self.closes.append(reason)


def make_conn(session: str, diagnosis_id: int = 1, user_id: int = 10, max_messages: int = 100,
              max_bytes: int = 100_000, live: bool = True) -> tuple[Connection, FakeTransport]:
    transport = FakeTransport()
    conn = Connection(session, diagnosis_id, user_id, "default", Outbox(max_bytes, max_messages), transport,
                      expires_at=1e12)
    if live:
        conn.go_live([], 0)
    return conn, transport


def unframe(frame: bytes) -> bytes:
    """The payload of a frame queued for the socket: outboxes may hold ready-made RFC 6455 text frames."""
    if frame[:1] != b"\x81":
        return frame
    size = frame[1] & 0x7F
    start = 2 if size < 126 else 4 if size == 126 else 10
    return frame[start:]


def drain(conn: Connection) -> list[tuple[bytes, int | None]]:
    """Everything queued for the client, as payloads, in order."""
    out = []
    while conn.outbox:
        frame, offset = conn.outbox.pop()
        out.append((unframe(frame), offset))
    return out


def test_hub_fanout_counts_and_reaches_every_connection_once() -> None:
    hub = Hub()
    conns = [make_conn(f"s{i}")[0] for i in range(5)]
    other = make_conn("o", diagnosis_id=2)[0]
    assert [hub.add(c) for c in conns] == [True, False, False, False, False]
    assert hub.add(other)
    assert not hub.add(conns[0])  # re-adding does not double count
    assert hub.count == 6
    assert hub.diagnosis_count == 2
    assert hub.fanout(1, b"f1", 1) == 5
    assert all(drain(c) == [(b"f1", 1)] for c in conns)
    assert drain(other) == []
    assert hub.fanout(3, b"nobody", 1) == 0


def test_hub_fanout_exclude_session_and_user_targeting() -> None:
    hub = Hub()
    a1, a2, b1 = make_conn("a1", user_id=1)[0], make_conn("a2", user_id=1)[0], make_conn("b1", user_id=2)[0]
    for c in (a1, a2, b1):
        hub.add(c)
    assert hub.fanout(1, b"x", 1, exclude_session="a1") == 2
    assert (drain(a1), drain(a2), drain(b1)) == ([], [(b"x", 1)], [(b"x", 1)])
    assert hub.fanout(1, b"p", None, user_id=1) == 2
    assert (drain(a1), drain(a2), drain(b1)) == ([(b"p", None)], [(b"p", None)], [])
    assert hub.fanout(1, b"q", None, exclude_session="a2", user_id=1) == 1
    assert (drain(a1), drain(a2), drain(b1)) == ([(b"q", None)], [], [])


def test_hub_remove_reports_last_connection() -> None:
    hub = Hub()
    a, b = make_conn("a")[0], make_conn("b")[0]
    hub.add(a)
    hub.add(b)
    assert not hub.remove(a)
    assert not hub.remove(a)  # twice is harmless
    assert hub.remove(b)
    assert hub.count == 0
    assert hub.diagnosis_count == 0
    assert hub.fanout(1, b"x", 1) == 0


def test_overflow_closes_only_the_slow_consumer_and_others_keep_receiving() -> None:
    hub = Hub()
    slow, slow_t = make_conn("slow", max_messages=3)
    fast = [make_conn(f"f{i}", max_messages=1000) for i in range(3)]
    hub.add(slow)
    for conn, _ in fast:
        hub.add(conn)
    counts = [hub.fanout(1, b"m%d" % i, i) for i in range(1, 11)]
    assert counts[:3] == [4, 4, 4]
    assert counts[3:] == [3] * 7
    assert slow_t.closes == [CloseReason.SLOW_CONSUMER]  # once, not once per frame
    assert slow.phase is ConnPhase.CLOSED
    assert slow.close_reason is CloseReason.SLOW_CONSUMER
    for conn, transport in fast:
        assert [o for _, o in drain(conn)] == list(range(1, 11))
        assert transport.closes == []
        assert transport.wakes >= 1


def test_overflow_in_bytes_closes_slow_consumer() -> None:
    conn, transport = make_conn("s", max_bytes=1024, max_messages=1000)
    assert conn.deliver(b"x" * 1000, 1)
    assert not conn.deliver(b"y" * 100, 2)
    assert transport.closes == [CloseReason.SLOW_CONSUMER]
    assert not conn.deliver(b"z", 3)  # closed: takes nothing more
    assert transport.closes == [CloseReason.SLOW_CONSUMER]


def test_syncing_buffer_merged_by_offset_in_go_live_without_duplicates() -> None:
    conn, transport = make_conn("s", live=False)
    assert conn.phase is ConnPhase.SYNCING
    # live publications arrive while history is being read: 4 and 5 are also in the replay
    for offset in (4, 5, 6, 7):
        assert conn.deliver(b"live%d" % offset, offset)
    assert conn.deliver(b"personal", None)
    assert drain(conn) == []
    assert transport.wakes == 0
    conn.go_live([b"connect", b"replay(1..5)"], seen_up_to=5)
    assert conn.phase is ConnPhase.LIVE
    assert [payload for payload, _ in drain(conn)] == [b"connect", b"replay(1..5)", b"live6", b"live7",
                                                        b"personal"]
    assert transport.wakes >= 1
    assert conn.highest_sent == 7
    assert conn.deliver(b"live8", 8)
    assert drain(conn) == [(b"live8", 8)]


def test_syncing_buffer_overflow_closes_slow_consumer() -> None:
    conn, transport = make_conn("s", max_messages=2, live=False)
    assert conn.deliver(b"a", 1)
    assert conn.deliver(b"b", 2)
    assert not conn.deliver(b"c", 3)
    assert transport.closes == [CloseReason.SLOW_CONSUMER]


def test_closed_connection_rejects_replies_and_closes_once() -> None:
    conn, transport = make_conn("s")
    conn.close(CloseReason.TOKEN_EXPIRED)
    conn.close(CloseReason.FORBIDDEN)
    conn.reply(b"pong")
    assert transport.closes == [CloseReason.TOKEN_EXPIRED]
    assert drain(conn) == []
    assert not conn.deliver(b"x", 1)


# -- OwnershipChecker with a fake source ---------------------------------------------------------------

class FakeSource:
    """An OwnershipSource whose answers and timing the test controls."""

    def __init__(self, owners: dict[int, int | None]) -> None:
        self.owners = owners
        self.calls: list[int] = []
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None
        self.started = asyncio.Event()

    async def owner_of(self, diagnosis_id: int) -> int | None:
        self.calls.append(diagnosis_id)
        answer = self.owners.get(diagnosis_id)  # the database's state when the query ran
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return answer

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_owner_is_cached_for_ttl() -> None:
    source, clock = FakeSource({1: 10}), Clock()
    checker = OwnershipChecker(source, ttl=5, clock=clock)
    assert await checker.owner_of(1) == 10
    source.owners[1] = 11
    clock.now += 4.9
    assert await checker.owner_of(1) == 10
    assert source.calls == [1]
    clock.now += 0.2
    assert await checker.owner_of(1) == 11
    assert source.calls == [1, 1]


async def test_no_such_diagnosis_is_cached_for_ttl() -> None:
    source, clock = FakeSource({}), Clock()
    checker = OwnershipChecker(source, ttl=5, clock=clock)
    assert await checker.owner_of(2) is None
    with pytest.raises(DiagnosisNotFound):
        await checker.require_exists(2)
    assert source.calls == [2]
    source.owners[2] = 20
    clock.now += 5.1
    assert await checker.owner_of(2) == 20
    assert source.calls == [2, 2]


async def test_ttl_zero_means_no_cache() -> None:
    source = FakeSource({1: 10})
    checker = OwnershipChecker(source, ttl=0, clock=Clock())
    await checker.owner_of(1)
    await checker.owner_of(1)
    assert source.calls == [1, 1]


async def test_fifty_concurrent_checks_share_one_query() -> None:
    source = FakeSource({7: 70})
    source.gate = asyncio.Event()
    checker = OwnershipChecker(source, ttl=5, clock=Clock())
    tasks = [asyncio.create_task(checker.owner_of(7)) for _ in range(50)]
    await asyncio.wait_for(source.started.wait(), 5)
    await asyncio.sleep(0)  # let every task reach the shared query
    source.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [70] * 50
    assert source.calls == [7]


async def test_failure_is_shared_by_waiters_and_not_cached() -> None:
    source = FakeSource({7: 70})
    source.gate = asyncio.Event()
    source.fail = OwnershipUnavailable("replica down")
    checker = OwnershipChecker(source, ttl=5, clock=Clock())
    tasks = [asyncio.create_task(checker.owner_of(7)) for _ in range(50)]
    await asyncio.wait_for(source.started.wait(), 5)
    source.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(r, OwnershipUnavailable) for r in results), results
    assert source.calls == [7]
    source.fail, source.gate = None, None
    assert await checker.owner_of(7) == 70  # recovered: the failure was not remembered
    assert source.calls == [7, 7]


async def test_cancelled_first_caller_does_not_fail_the_others() -> None:
    """A reconnect storm shares one query; the caller that started it going away must not break the rest."""
    source = FakeSource({7: 70})
    source.gate = asyncio.Event()
    checker = OwnershipChecker(source, ttl=5, clock=Clock())
    first = asyncio.create_task(checker.owner_of(7))
    await asyncio.wait_for(source.started.wait(), 5)
    others = [asyncio.create_task(checker.owner_of(7)) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    source.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 5)
    assert results == [70] * 5, results
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_forget_drops_the_cached_decision() -> None:
    source = FakeSource({3: 30})
    checker = OwnershipChecker(source, ttl=60, clock=Clock())
    assert await checker.owner_of(3) == 30
    source.owners[3] = 31
    assert await checker.owner_of(3) == 30
    checker.forget(3)
    assert await checker.owner_of(3) == 31
    assert source.calls == [3, 3]
    checker.forget(999)  # unknown: harmless


async def test_forget_during_an_inflight_lookup_is_not_undone_by_it() -> None:
    """Revoke = forget + re-check: a query that started before the revoke must not answer for after it."""
    source = FakeSource({3: 30})
    source.gate = asyncio.Event()
    checker = OwnershipChecker(source, ttl=60, clock=Clock())
    stale = asyncio.create_task(checker.owner_of(3))
    await asyncio.wait_for(source.started.wait(), 5)
    source.owners[3] = 31  # ownership changes in the database, then the main API calls revoke
    checker.forget(3)
    fresh = asyncio.create_task(checker.owner_of(3))
    await asyncio.sleep(0)
    source.gate.set()
    await asyncio.wait_for(stale, 5)
    assert await asyncio.wait_for(fresh, 5) == 31
    assert await checker.owner_of(3) == 31  # and the stale answer was not cached


async def test_require_watcher_and_publisher() -> None:
    checker = OwnershipChecker(FakeSource({1: 10}), ttl=5, clock=Clock())
    user = Principal(sub="10", user_id=10, is_service=False, expires_at=0)
    stranger = Principal(sub="11", user_id=11, is_service=False, expires_at=0)
    service = Principal(sub="main-api", user_id=None, is_service=True, expires_at=0)
    await checker.require_watcher(user, 1)
    await checker.require_publisher(user, 1)
    await checker.require_publisher(service, 1)
    for principal, check in ((stranger, checker.require_watcher), (service, checker.require_watcher),
                             (stranger, checker.require_publisher)):
        with pytest.raises(Forbidden):
            await check(principal, 1)
    with pytest.raises(DiagnosisNotFound):
        await checker.require_publisher(service, 2)
    assert await checker.may_watch(10, 1)
    assert not await checker.may_watch(11, 1)
