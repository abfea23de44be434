"""PROTOCOL 4 over real HTTP: the publish endpoints and the frames they build, batches, errors, read endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import psycopg2
import pytest

from tests.conftest import PgServer, free_port
from tests.fixtures_app import Service, StartService, make_settings
from tests.support import Seeder
from tests.test_ownership import counting_app

SERVICE = object()  # "use a fresh service token"


async def call(service: Service, method: str, path: str, body: Any = None, token: Any = SERVICE,
               raw: bytes | None = None, authorization: str | None = None) -> tuple[int, Any, str]:
    """One request; returns (status, parsed JSON body, raw text)."""
    headers: dict[str, str] = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is SERVICE:
        headers["Authorization"] = f"Bearer {service.tokens.service()}"
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    kwargs: dict[str, Any] = {"headers": headers}
    if raw is not None:
        kwargs["data"] = raw
        headers["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["json"] = body
    async with service.http.request(method, f"{service.base_url}{path}", **kwargs) as resp:
        text = await resp.text()
        assert resp.content_type == "application/json", (resp.status, resp.content_type, text[:200])
        return resp.status, json.loads(text), text


def assert_envelope(status: int, body: Any, expected_status: int) -> dict[str, Any]:
    """The error envelope of PROTOCOL 4: {"error": {"code", "message", "fields"?}}."""
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) <= {"code", "message", "fields"}, error
    assert isinstance(error["code"], str), error
    assert error["code"], error
    assert isinstance(error["message"], str), error
    if "fields" in error:
        assert isinstance(error["fields"], dict), error
    return error


def named(error: dict[str, Any], field: str) -> bool:
    """The envelope names the failing field (as a key of `fields`, possibly with a path prefix)."""
    return any(key == field or key.endswith(f".{field}") for key in error.get("fields", {}))


async def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- frames built by the broadcast endpoints ------------------------------------------------------------------

RECOMMENDATION_CASES: list[tuple[str, dict[str, Any], dict[str, Any], list[str]]] = [
    ("scalar_changed", {"herb": "mint", "dose": 2}, {"herb": "mint", "dose": 3}, ["dose"]),
    ("nothing_changed", {"herb": "mint", "dose": 2}, {"herb": "mint", "dose": 2}, []),
    ("nested_change_names_top_key", {"schedule": {"am": 1, "pm": {"n": [1, 2]}}, "a": 1},
     {"schedule": {"am": 1, "pm": {"n": [1, 3]}}, "a": 1}, ["schedule"]),
    ("key_order_is_not_a_change", {"schedule": {"am": 1, "pm": 2}}, {"schedule": {"pm": 2, "am": 1}}, []),
    ("list_order_is_a_change", {"tags": ["a", "b"]}, {"tags": ["b", "a"]}, ["tags"]),
    ("removed_null_counts", {"notes": None, "a": 1}, {"a": 1}, ["notes"]),
    ("added_null_counts", {"a": 1}, {"a": 1, "notes": None}, ["notes"]),
    ("null_to_value", {"notes": None}, {"notes": "x"}, ["notes"]),
    ("sorted", {"z": 1, "b": 1, "m": 1}, {"z": 2, "b": 2, "m": 2, "a": 0}, ["a", "b", "m", "z"]),
]


@pytest.mark.parametrize(("case", "old", "new", "changed"), RECOMMENDATION_CASES,
                         ids=[c[0] for c in RECOMMENDATION_CASES])
async def test_recommendation_update_frame(service: Service, case: str, old: dict[str, Any], new: dict[str, Any],
                                           changed: list[str]) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    status, result, _ = await call(service, "POST", "/ws/broadcast-recommendation-update",
                                   {"diagnosis_id": did, "old_data": old, "new_data": new, "reason": "new study"})
    assert status == 200, result
    epoch = client.frames[0]["data"]["epoch"]
    assert result == {"diagnosis_id": did, "offset": 1, "epoch": epoch, "delivered": 1}
    frame = await client.next_of("recommendation_update")
    assert frame["diagnosis_id"] == did
    assert (frame["offset"], frame["epoch"]) == (1, epoch)
    assert frame["timestamp"].endswith("Z")
    assert frame["data"] == {"old_recommendation": old, "new_recommendation": new, "reason": "new study",
                             "changed_fields": changed}
    await client.close()


EFFECTIVENESS_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("required_only", {}, {}),
    ("with_old_and_herb", {"old_effectiveness": 0.5, "herb": "mint"},
     {"old_effectiveness": 0.5, "herb": "mint", "improvement": 0.25}),
    ("old_zero_is_given", {"old_effectiveness": 0}, {"old_effectiveness": 0, "improvement": 0.75}),
    ("worse", {"old_effectiveness": 1}, {"old_effectiveness": 1, "improvement": -0.25}),
    ("herb_only", {"herb": "ginger"}, {"herb": "ginger"}),
]


@pytest.mark.parametrize(("case", "extra", "expected_extra"), EFFECTIVENESS_CASES,
                         ids=[c[0] for c in EFFECTIVENESS_CASES])
async def test_effectiveness_update_frame(service: Service, case: str, extra: dict[str, Any],
                                          expected_extra: dict[str, Any]) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    body = {"diagnosis_id": did, "recommendation_id": 7, "new_effectiveness": 0.75, "confidence": 0.9,
            "sample_size": 12, **extra}
    status, result, _ = await call(service, "POST", "/ws/broadcast-effectiveness-update", body)
    assert status == 200, result
    assert result["offset"] == 1
    frame = await client.next_of("effectiveness_update")
    data = frame["data"]
    improvement = data.pop("improvement", None)
    expected = {"recommendation_id": 7, "new_effectiveness": 0.75, "confidence": 0.9, "sample_size": 12,
                **expected_extra}
    expected_improvement = expected.pop("improvement", None)
    assert data == expected
    if expected_improvement is None:
        assert improvement is None
    else:
        assert improvement == pytest.approx(expected_improvement)
    await client.close()


async def test_effectiveness_improvement_is_new_minus_old(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    body = {"diagnosis_id": did, "recommendation_id": 1, "new_effectiveness": 0.7, "old_effectiveness": 0.4,
            "confidence": 1, "sample_size": 0}
    status, result, _ = await call(service, "POST", "/ws/broadcast-effectiveness-update", body)
    assert status == 200, result
    frame = await client.next_of("effectiveness_update")
    assert frame["data"]["improvement"] == pytest.approx(0.3)
    await client.close()


@pytest.mark.parametrize(("extra", "expected_extra"), [
    ({}, {}),
    ({"recommendation_id": 5, "comment": "helped a lot"}, {"recommendation_id": 5, "comment": "helped a lot"}),
    ({"comment": ""}, {"comment": ""}),
], ids=["required_only", "with_optional", "empty_comment"])
async def test_feedback_update_frame(service: Service, extra: dict[str, Any], expected_extra: dict[str, Any]) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    body = {"diagnosis_id": did, "feedback_id": 3, "rating": 4, "effectiveness": 0.5, **extra}
    status, result, _ = await call(service, "POST", "/ws/broadcast-feedback-update", body)
    assert status == 200, result
    frame = await client.next_of("feedback_update")
    assert frame["data"] == {"feedback_id": 3, "rating": 4, "effectiveness": 0.5, **expected_extra}
    assert frame["offset"] == 1
    await client.close()


@pytest.mark.parametrize("data", [{"herb": "mint", "nested": {"list": [1, 2.5, None, True]}}, [1, "two"], "text", 0,
                                  None], ids=["object", "list", "string", "number", "null"])
async def test_publish_custom_type(service: Service, data: Any) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    status, result, _ = await call(service, "POST", "/api/v1/publish",
                                   {"diagnosis_id": did, "type": "herb_stock_changed", "data": data})
    assert status == 200, result
    assert result["offset"] == 1
    frame = await client.next_of("herb_stock_changed")
    assert frame["data"] == data
    assert frame["diagnosis_id"] == did
    assert frame["offset"] == 1
    await client.close()


@pytest.mark.parametrize("type_", ["connect", "pong", "reconnect_messages", "error", "auth", "ping", "Herb",
                                   "1herb", "herb-update", "", "h" * 65, "herb update", "ünicode"])
async def test_publish_refuses_reserved_and_malformed_types(service: Service, type_: str) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    status, body, _ = await call(service, "POST", "/api/v1/publish", {"diagnosis_id": did, "type": type_, "data": {}})
    assert named(assert_envelope(status, body, 422), "type"), body
    result = await service.publish(did, "h" * 64)
    assert result["offset"] == 1
    frame = await client.next_of("h" * 64)
    assert frame["offset"] == 1
    await client.close()


# -- batches ---------------------------------------------------------------------------------------------------

BATCH_FAILURES = ["reserved_type_last", "bad_user_id", "personal_to_non_watcher", "unknown_diagnosis",
                  "user_token_not_owner_of_one", "bad_type_first"]


@pytest.mark.parametrize("case", BATCH_FAILURES)
async def test_batch_is_all_or_nothing(service: Service, case: str) -> None:
    uid, did = service.seed.owned()
    other_uid, other_did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    good = [{"diagnosis_id": did, "type": "step", "data": {"n": n}} for n in range(3)]
    token: Any = SERVICE
    bad: dict[str, Any]
    expected_status, field = 422, ""
    if case == "reserved_type_last":
        messages, field = [*good, {"diagnosis_id": did, "type": "pong", "data": {}}], "type"
    elif case == "bad_type_first":
        messages, field = [{"diagnosis_id": did, "type": "Bad", "data": {}}, *good], "type"
    elif case == "bad_user_id":
        bad = {"diagnosis_id": did, "type": "note", "data": {}, "user_id": 0}
        messages, field = [*good, bad], "user_id"
    elif case == "personal_to_non_watcher":
        bad = {"diagnosis_id": did, "type": "note", "data": {}, "user_id": other_uid}
        messages, field = [*good, bad], "user_id"
    elif case == "unknown_diagnosis":
        messages, expected_status = [*good, {"diagnosis_id": service.seed.unknown(), "type": "x", "data": {}}], 404
    else:
        token = service.tokens.user(uid)
        messages, expected_status = [*good, {"diagnosis_id": other_did, "type": "x", "data": {}}], 403
    status, body, text = await call(service, "POST", "/api/v1/publish/batch", {"messages": messages}, token=token)
    error = assert_envelope(status, body, expected_status)
    if field:
        assert named(error, field), body
    if token is not SERVICE:
        assert token not in text
    # nothing was published: the next message gets offset 1, and it is the client's first broadcast
    result = await service.publish(did, "after")
    assert result["offset"] == 1
    frame = await client.next_of("after")
    assert frame["offset"] == 1
    assert client.offsets() == [1]
    assert [f["type"] for f in client.frames] == ["connect", "after"]
    _, status_body, _ = await call(service, "GET", "/ws/status", token=None)
    assert status_body["retained_messages"] == 1
    await client.close()


async def test_batch_of_1000_is_published_in_order(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    messages = [{"diagnosis_id": did, "type": "item", "data": {"n": n}} for n in range(1000)]
    status, body, _ = await call(service, "POST", "/api/v1/publish/batch", {"messages": messages})
    assert status == 200, body
    assert [r["offset"] for r in body["results"]] == list(range(1, 1001))
    assert all(r["diagnosis_id"] == did for r in body["results"])
    await client.wait_offset(1000)
    items = client.of_type("item")
    assert [f["data"]["n"] for f in items] == list(range(1000))
    assert [f["offset"] for f in items] == list(range(1, 1001))
    await client.close()


async def test_batch_of_1001_is_422(service: Service) -> None:
    _, did = service.seed.owned()
    messages = [{"diagnosis_id": did, "type": "item", "data": {}} for _ in range(1001)]
    status, body, _ = await call(service, "POST", "/api/v1/publish/batch", {"messages": messages})
    assert named(assert_envelope(status, body, 422), "messages"), body
    assert (await service.publish(did))["offset"] == 1


async def test_batch_mixes_personal_and_broadcast(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    messages = [{"diagnosis_id": did, "type": "a", "data": {}}, {"diagnosis_id": did, "type": "p", "data": {},
                                                                  "user_id": uid},
                {"diagnosis_id": did, "type": "b", "data": {}}]
    status, body, _ = await call(service, "POST", "/api/v1/publish/batch", {"messages": messages})
    assert status == 200, body
    assert [r["offset"] for r in body["results"]] == [1, None, 2]
    assert [r["delivered"] for r in body["results"]] == [1, 1, 1]
    await client.wait(lambda c: len(c.frames) >= 4, "three messages")
    assert [f["type"] for f in client.frames[1:]] == ["a", "p", "b"]
    assert "offset" not in client.frames[2]
    await client.close()


# -- exclude_session ---------------------------------------------------------------------------------------------

def exclude_body(endpoint: str, did: int, session: str, n: int) -> tuple[str, dict[str, Any], str]:
    """(path, body, frame type) of a publish on `endpoint` carrying exclude_session."""
    if endpoint == "publish":
        return "/api/v1/publish", {"diagnosis_id": did, "type": "echo", "data": {"n": n},
                                   "exclude_session": session}, "echo"
    if endpoint == "feedback":
        return "/ws/broadcast-feedback-update", {"diagnosis_id": did, "feedback_id": n, "rating": 5,
                                                 "effectiveness": 1, "exclude_session": session}, "feedback_update"
    if endpoint == "recommendation":
        return "/ws/broadcast-recommendation-update", {"diagnosis_id": did, "old_data": {}, "new_data": {"n": n},
                                                       "reason": "r", "exclude_session": session}, \
            "recommendation_update"
    return "/api/v1/publish/batch", {"messages": [{"diagnosis_id": did, "type": "echo", "data": {"n": n},
                                                   "exclude_session": session}]}, "echo"


@pytest.mark.parametrize("endpoint", ["publish", "feedback", "recommendation", "batch"])
async def test_exclude_session_skips_only_that_connection(service: Service, endpoint: str) -> None:
    uid, did = service.seed.owned()
    origin = await service.connect(did, service.tokens.user(uid), device="phone")
    other = await service.connect(did, service.tokens.user(uid), device="web")
    epoch = origin.frames[0]["data"]["epoch"]
    path, body, type_ = exclude_body(endpoint, did, origin.frames[0]["data"]["session"], 1)
    status, result, _ = await call(service, "POST", path, body)
    assert status == 200, result
    first = result["results"][0] if endpoint == "batch" else result
    assert first["offset"] == 1
    assert first["delivered"] == 1
    assert (await other.next_of(type_))["offset"] == 1
    await service.publish(did, "marker")  # offset 2 reaches both; the excluded one saw nothing before it
    await origin.wait_offset(2)
    await other.wait_offset(2)
    assert origin.offsets() == [2]
    assert other.offsets() == [1, 2]
    # the history keeps it
    replay = await service.connect(did, service.tokens.user(uid), device="tablet", since=0, epoch=epoch)
    frame = (await replay.wait(lambda c: c.of_type("reconnect_messages"), "the replay"))[0]
    assert [m["offset"] for m in frame["data"]["messages"]] == [1, 2]
    assert frame["data"]["messages"][0]["type"] == type_
    for client in (origin, other, replay):
        await client.close()


# -- errors ----------------------------------------------------------------------------------------------------

async def test_malformed_json_is_400(service: Service) -> None:
    _, did = service.seed.owned()
    for raw in (b'{"diagnosis_id": 1,', b"{'single': 'quotes'}", b"", b"\xff\xfe"):
        status, body, _ = await call(service, "POST", "/api/v1/publish", raw=raw)
        assert_envelope(status, body, 400)
    assert (await service.publish(did))["offset"] == 1


def unauthorized_headers(service: Service, uid: int) -> dict[str, str | None]:
    now = int(time.time())
    wrong_secret = jwt.encode({"sub": "main-api", "scope": "realtime:publish", "exp": now + 60}, "w" * 32,
                              algorithm="HS256")
    alg_none = jwt.encode({"sub": "main-api", "scope": "realtime:publish", "exp": now + 60}, None,
                          algorithm="none")
    return {
        "missing": None,
        "not_bearer": f"Basic {service.tokens.service()}",
        "bearer_empty": "Bearer ",
        "garbage": "Bearer garbage.token.value",
        "wrong_secret": f"Bearer {wrong_secret}",
        "alg_none": f"Bearer {alg_none}",
        "expired": f"Bearer {service.tokens.service(ttl=-60)}",
        "expired_user": f"Bearer {service.tokens.user(uid, ttl=-60)}",
    }


@pytest.mark.parametrize("case", ["missing", "not_bearer", "bearer_empty", "garbage", "wrong_secret", "alg_none",
                                  "expired", "expired_user"])
async def test_unauthorized_is_401_without_echoing_the_token(service: Service, case: str) -> None:
    uid, did = service.seed.owned()
    authorization = unauthorized_headers(service, uid)[case]
    requests = [("POST", "/api/v1/publish", {"diagnosis_id": did, "type": "x", "data": {}}),
                ("POST", "/ws/broadcast-feedback-update", {"diagnosis_id": did, "feedback_id": 1, "rating": 1,
                                                           "effectiveness": 0}),
                ("POST", "/api/v1/publish/batch", {"messages": [{"diagnosis_id": did, "type": "x", "data": {}}]}),
                ("GET", f"/api/v1/diagnoses/{did}/presence", None)]
    for method, path, body in requests:
        status, answer, text = await call(service, method, path, body, token=None, authorization=authorization)
        assert_envelope(status, answer, 401)
        if authorization:
            secret = authorization.partition(" ")[2].strip()
            if secret:
                assert secret not in text
                for part in secret.split("."):
                    if len(part) > 8:
                        assert part not in text, path
    assert (await service.publish(did))["offset"] == 1


@pytest.mark.parametrize("scope", ["realtime:publish", "openid realtime:publish email", ["email", "realtime:publish"]],
                         ids=["string", "space_separated", "list"])
async def test_service_token_scope_forms(service: Service, scope: Any) -> None:
    _, did = service.seed.owned()
    token = service.tokens.encode({"sub": "main-api", "scope": scope, "exp": int(time.time()) + 60})
    status, body, _ = await call(service, "POST", "/api/v1/publish", {"diagnosis_id": did, "type": "x", "data": {}},
                                 token=token)
    assert status == 200, body
    status, body, _ = await call(service, "GET", f"/api/v1/diagnoses/{did}/presence", token=token)
    assert status == 200, body


async def test_user_token_forbidden_on_others_diagnosis_and_service_endpoints(service: Service) -> None:
    uid, did = service.seed.owned()
    _, other_did = service.seed.owned()
    token = service.tokens.user(uid)
    for path, body in [
        ("/api/v1/publish", {"diagnosis_id": other_did, "type": "x", "data": {}}),
        ("/ws/broadcast-recommendation-update", {"diagnosis_id": other_did, "old_data": {}, "new_data": {},
                                                 "reason": "r"}),
        ("/ws/broadcast-effectiveness-update", {"diagnosis_id": other_did, "recommendation_id": 1,
                                                "new_effectiveness": 1, "confidence": 1, "sample_size": 1}),
        ("/ws/broadcast-feedback-update", {"diagnosis_id": other_did, "feedback_id": 1, "rating": 1,
                                           "effectiveness": 0}),
    ]:
        status, answer, text = await call(service, "POST", path, body, token=token)
        assert_envelope(status, answer, 403)
        assert token not in text
    # service-only endpoints, even for the owner's own diagnosis
    for method, path in [("GET", f"/api/v1/diagnoses/{did}/presence"),
                         ("GET", f"/api/v1/diagnoses/{did}/deliveries")]:
        status, answer, text = await call(service, method, path, token=token)
        assert_envelope(status, answer, 403)
        assert token not in text
    # the owner may publish to its own diagnosis
    status, answer, _ = await call(service, "POST", "/api/v1/publish", {"diagnosis_id": did, "type": "x", "data": {}},
                                   token=token)
    assert status == 200, answer
    assert answer["offset"] == 1


async def test_unknown_diagnosis_is_404(service: Service) -> None:
    unknown = service.seed.unknown()
    for method, path, body in [
        ("POST", "/api/v1/publish", {"diagnosis_id": unknown, "type": "x", "data": {}}),
        ("POST", "/ws/broadcast-feedback-update", {"diagnosis_id": unknown, "feedback_id": 1, "rating": 1,
                                                   "effectiveness": 0}),
        ("GET", f"/api/v1/diagnoses/{unknown}/presence", None),
        ("GET", f"/api/v1/diagnoses/{unknown}/deliveries", None),
    ]:
        status, answer, _ = await call(service, method, path, body)
        assert_envelope(status, answer, 404)


async def test_other_http_errors_use_the_envelope(service: Service) -> None:
    for method, path in [("GET", "/api/v1/nothing-here"), ("GET", "/api/v1/publish"),
                         ("GET", "/api/v1/diagnoses/0/presence"), ("GET", "/api/v1/diagnoses/abc/presence")]:
        status, answer, _ = await call(service, method, path)
        assert status in (404, 405), (path, status)
        assert_envelope(status, answer, status)


async def test_body_over_limit_is_413(start_service: StartService) -> None:
    service = await start_service(max_body_bytes=2048)
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    big = {"diagnosis_id": did, "type": "x", "data": {"text": "y" * 3000}}
    status, answer, _ = await call(service, "POST", "/api/v1/publish", big)
    assert_envelope(status, answer, 413)

    async def chunks() -> AsyncIterator[bytes]:
        raw = json.dumps(big).encode()
        for i in range(0, len(raw), 512):
            yield raw[i:i + 512]

    async with service.http.post(f"{service.base_url}/api/v1/publish", data=chunks(),
                                 headers={"Authorization": f"Bearer {service.tokens.service()}",
                                          "Content-Type": "application/json"}) as resp:
        assert_envelope(resp.status, await resp.json(), 413)
    # a body just under the limit is fine, and it is the first message
    small = {"diagnosis_id": did, "type": "x", "data": {"text": "y" * 1500}}
    assert len(json.dumps(small)) < 2048
    status, answer, _ = await call(service, "POST", "/api/v1/publish", small)
    assert status == 200, answer
    assert answer["offset"] == 1
    await client.next_of("x")
    assert [f["type"] for f in client.frames] == ["connect", "x"]
    await client.close()


VALIDATION_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("rating_0", "feedback", {"rating": 0}, "rating"),
    ("rating_6", "feedback", {"rating": 6}, "rating"),
    ("rating_3.5", "feedback", {"rating": 3.5}, "rating"),
    ("rating_string", "feedback", {"rating": "3"}, "rating"),
    ("rating_missing", "feedback", {"rating": None}, "rating"),
    ("effectiveness_1.5", "feedback", {"effectiveness": 1.5}, "effectiveness"),
    ("effectiveness_negative", "feedback", {"effectiveness": -0.1}, "effectiveness"),
    ("feedback_id_0", "feedback", {"feedback_id": 0}, "feedback_id"),
    ("feedback_recommendation_id_0", "feedback", {"recommendation_id": 0}, "recommendation_id"),
    ("feedback_diagnosis_id_0", "feedback", {"diagnosis_id": 0}, "diagnosis_id"),
    ("sample_size_-1", "effectiveness", {"sample_size": -1}, "sample_size"),
    ("sample_size_1.5", "effectiveness", {"sample_size": 1.5}, "sample_size"),
    ("new_effectiveness_1.5", "effectiveness", {"new_effectiveness": 1.5}, "new_effectiveness"),
    ("old_effectiveness_2", "effectiveness", {"old_effectiveness": 2}, "old_effectiveness"),
    ("confidence_-1", "effectiveness", {"confidence": -1}, "confidence"),
    ("recommendation_id_0", "effectiveness", {"recommendation_id": 0}, "recommendation_id"),
    ("effectiveness_diagnosis_id_-5", "effectiveness", {"diagnosis_id": -5}, "diagnosis_id"),
    ("publish_diagnosis_id_0", "publish", {"diagnosis_id": 0}, "diagnosis_id"),
    ("publish_diagnosis_id_string", "publish", {"diagnosis_id": "12"}, "diagnosis_id"),
    ("publish_user_id_0", "publish", {"user_id": 0}, "user_id"),
    ("reason_missing", "recommendation", {"reason": None}, "reason"),
    ("old_data_not_object", "recommendation", {"old_data": [1]}, "old_data"),
]


def valid_body(kind: str, did: int) -> tuple[str, dict[str, Any]]:
    return {
        "feedback": ("/ws/broadcast-feedback-update",
                     {"diagnosis_id": did, "feedback_id": 1, "rating": 3, "effectiveness": 0.5}),
        "effectiveness": ("/ws/broadcast-effectiveness-update",
                          {"diagnosis_id": did, "recommendation_id": 1, "new_effectiveness": 0.5, "confidence": 0.5,
                           "sample_size": 3}),
        "publish": ("/api/v1/publish", {"diagnosis_id": did, "type": "x", "data": {}}),
        "recommendation": ("/ws/broadcast-recommendation-update",
                           {"diagnosis_id": did, "old_data": {}, "new_data": {}, "reason": "r"}),
    }[kind]


@pytest.mark.parametrize(("case", "kind", "change", "field"), VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES])
async def test_invalid_body_is_422_naming_the_field(service: Service, case: str, kind: str, change: dict[str, Any],
                                                    field: str) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    path, body = valid_body(kind, did)
    for key, value in change.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    status, answer, _ = await call(service, "POST", path, body)
    error = assert_envelope(status, answer, 422)
    assert named(error, field), error
    # nothing was broadcast
    assert (await service.publish(did, "after"))["offset"] == 1
    await client.next_of("after")
    assert [f["type"] for f in client.frames] == ["connect", "after"]
    await client.close()


async def test_edges_of_ranges_are_valid(service: Service) -> None:
    _, did = service.seed.owned()
    for kind, change in [("feedback", {"rating": 1, "effectiveness": 0}),
                         ("feedback", {"rating": 5, "effectiveness": 1}),
                         ("effectiveness", {"sample_size": 0, "new_effectiveness": 1, "confidence": 0,
                                            "old_effectiveness": 0})]:
        path, body = valid_body(kind, did)
        body.update(change)
        status, answer, _ = await call(service, "POST", path, body)
        assert status == 200, (kind, change, answer)


# -- read endpoints --------------------------------------------------------------------------------------------

async def test_status_totals_and_per_diagnosis_detail(service: Service) -> None:
    uid1, did1 = service.seed.owned()
    uid2, did2 = service.seed.owned()
    clients = [await service.connect(did1, service.tokens.user(uid1), device="phone"),
               await service.connect(did1, service.tokens.user(uid1), device="web"),
               await service.connect(did2, service.tokens.user(uid2))]
    for _ in range(3):
        await service.publish(did1)
    await service.publish(did2)
    totals = {"connections": 3, "diagnoses": 2, "retained_messages": 4}
    for token in (None, service.tokens.user(uid1), "garbage"):
        status, body, _ = await call(service, "GET", "/ws/status", token=token)
        assert status == 200
        assert body == totals, token
    status, body, _ = await call(service, "GET", "/ws/status")
    assert status == 200
    assert body == {**totals, "per_diagnosis": {str(did1): {"connections": 2, "users": 1, "offset": 3},
                                                str(did2): {"connections": 1, "users": 1, "offset": 1}}}
    for client in clients:
        await client.close()

    async def empty() -> bool:
        _, now, _ = await call(service, "GET", "/ws/status", token=None)
        return bool(now["connections"] == 0 and now["diagnoses"] == 0)

    await until(empty, "connections to be gone from /ws/status")


async def test_presence_users_connections_devices(service: Service) -> None:
    uid, did = service.seed.owned()
    status, body, _ = await call(service, "GET", f"/api/v1/diagnoses/{did}/presence")
    assert (status, body) == (200, {"diagnosis_id": did, "users": []})
    phone = await service.connect(did, service.tokens.user(uid), device="phone")
    web = await service.connect(did, service.tokens.user(uid), device="web")
    web2 = await service.connect(did, service.tokens.user(uid), device="web")
    status, body, _ = await call(service, "GET", f"/api/v1/diagnoses/{did}/presence")
    assert status == 200
    assert body["diagnosis_id"] == did
    assert len(body["users"]) == 1
    user = body["users"][0]
    assert (user["user_id"], user["connections"], sorted(user["devices"])) == (uid, 3, ["phone", "web"])
    for client in (phone, web, web2):
        await client.close()

    async def gone() -> bool:
        _, now, _ = await call(service, "GET", f"/api/v1/diagnoses/{did}/presence")
        return bool(now["users"] == [])

    await until(gone, "presence to empty")


async def test_every_bigint_id_works_on_every_endpoint(service: Service) -> None:
    """Ids are bigint in the main API: a 19-digit id is as valid for presence as it is for publish."""
    uid = service.seed.user()
    did = 10**18 + service.seed.unknown()
    conn = psycopg2.connect(service.seed.dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("INSERT INTO diagnoses (id, user_id) VALUES (%s, %s)", (did, uid))
    finally:
        conn.close()
    status, body, _ = await call(service, "POST", "/api/v1/publish", {"diagnosis_id": did, "type": "x", "data": {}})
    assert status == 200, body
    for path in (f"/api/v1/diagnoses/{did}/presence", f"/api/v1/diagnoses/{did}/deliveries"):
        status, body, _ = await call(service, "GET", path)
        assert status == 200, (path, body)
        assert body["diagnosis_id"] == did
    status, body, _ = await call(service, "POST", "/api/v1/publish", {"diagnosis_id": 2**63, "type": "x", "data": {}})
    assert named(assert_envelope(status, body, 422), "diagnosis_id"), body


async def test_healthz_and_readyz(service: Service) -> None:
    status, body, _ = await call(service, "GET", "/healthz", token=None)
    assert status == 200
    assert isinstance(body, dict)
    status, body, _ = await call(service, "GET", "/readyz", token=None)
    assert status == 200, body
    assert isinstance(body, dict)


async def test_readyz_503_naming_replica_when_it_does_not_answer(start_service: StartService) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    service = await start_service(database_url=dead, db_connect_timeout=0.5, db_statement_timeout=0.5)
    started = time.monotonic()
    status, body, _ = await call(service, "GET", "/readyz", token=None)
    assert status == 503, body
    assert "replica" in json.dumps(body)
    assert time.monotonic() - started < 3.5
    status, body, _ = await call(service, "GET", "/healthz", token=None)
    assert status == 200, body


# -- offsets and delivery --------------------------------------------------------------------------------------

async def test_offsets_gapless_under_concurrent_publishes(service: Service) -> None:
    uid, did = service.seed.owned()
    clients = [await service.connect(did, service.tokens.user(uid), device=d) for d in ("a", "b")]

    async def publisher(task: int) -> list[int]:
        offsets = []
        for n in range(25):
            result = await service.publish(did, "conc", {"task": task, "n": n})
            offsets.append(result["offset"])
        return offsets

    per_task = await asyncio.gather(*(publisher(t) for t in range(8)))
    for offsets in per_task:
        assert offsets == sorted(offsets)
    assert sorted(o for offsets in per_task for o in offsets) == list(range(1, 201))
    for client in clients:
        await client.wait_offset(200)
        assert client.offsets() == list(range(1, 201))
        seen: dict[int, list[int]] = {}
        for frame in client.of_type("conc"):
            seen.setdefault(frame["data"]["task"], []).append(frame["data"]["n"])
        assert seen == {t: list(range(25)) for t in range(8)}
        await client.close()


async def test_delivered_counts_connections(service: Service) -> None:
    uid, did = service.seed.owned()
    assert (await service.publish(did))["delivered"] == 0
    one = await service.connect(did, service.tokens.user(uid), device="a")
    assert (await service.publish(did))["delivered"] == 1
    two = await service.connect(did, service.tokens.user(uid), device="b")
    result = await service.publish(did)
    assert result["delivered"] == 2
    assert result["offset"] == 3
    personal = await service.publish(did, "note", user_id=uid)
    assert personal["offset"] is None
    assert personal["delivered"] == 2
    _, other_did = service.seed.owned()
    assert (await service.publish(other_did))["delivered"] == 0
    await one.close()
    await two.close()


async def test_a_caller_giving_up_does_not_fail_its_idempotent_repeat(pg_server: PgServer,
                                                                      start_service: StartService) -> None:
    """A publish is retried with the same Idempotency-Key while the first attempt runs, and the first caller
    then gives up (its client timed out): the retry still gets an answer, and the message goes out once."""
    dsn = pg_server.create_database("rest_idempotent_give_up")
    seed = Seeder(dsn)
    uid, did = seed.owned()
    app, source = counting_app(make_settings(dsn), delay=0.6)
    service = await start_service(app=app)
    body = {"diagnosis_id": did, "type": "once", "data": {}}
    headers = {"Authorization": f"Bearer {service.tokens.service()}", "Idempotency-Key": "retry-1"}

    async def post() -> tuple[int, Any]:
        async with service.http.post(f"{service.base_url}/api/v1/publish", json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    first = asyncio.create_task(post())

    async def checking() -> bool:
        return source.calls.get(did, 0) >= 1

    await until(checking, "the first attempt to start its check")
    retry = asyncio.create_task(post())
    # the retry only has to reach the in-flight attempt (local, well under a millisecond); the check runs 0.6 s
    await asyncio.sleep(0.2)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    status, answer = await asyncio.wait_for(retry, 10)
    assert status == 200, answer
    assert answer["offset"] == 1
    client = await service.connect(did, service.tokens.user(uid), since=0, epoch=answer["epoch"])
    replay = (await client.wait(lambda c: c.of_type("reconnect_messages"), "the replay"))[0]
    assert [m["type"] for m in replay["data"]["messages"]] == ["once"]
    await client.close()
