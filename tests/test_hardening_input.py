"""Issue 9, findings 3, 4 and 8: hostile numbers and nesting get the specific answer, never a 500 or a 1011.

- a `since` of thousands of digits (Python's int() refuses over 4,300) or beyond 64 bits: 400 bad_resume on the
  upgrade request, `invalid_token` in an auth frame;
- `data` (publish) or `old_data`/`new_data` (recommendation) nested deeper than orjson can serialise: 422 naming
  the field, nothing broadcast;
- a token whose `sub` has 5,000 digits, whose `exp` is 10**400, `true`, NaN or out of range: invalid_token / 401.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest

from realtime_service.auth.tokens import TokenVerifier
from realtime_service.errors import InvalidToken
from realtime_service.protocol.models import MAX_DATA_DEPTH, PublishRequest, nesting_depth
from realtime_service.protocol.session import Authenticate, Close, Session, parse_resume
from tests.fixtures_app import Service
from tests.support import SECRET

HUGE = "9" * 4301
MAX_OFFSET = 2**63 - 1


# -- finding 3: since ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("since", [HUGE, "9" * 20, str(MAX_OFFSET + 1), MAX_OFFSET + 1, 2**64 - 1, 10**30])
def test_parse_resume_refuses_offsets_beyond_64_bits(since: Any) -> None:
    assert isinstance(parse_resume(since, None, None), str)


@pytest.mark.parametrize("since", [str(MAX_OFFSET), MAX_OFFSET, "0", 0])
def test_parse_resume_accepts_every_64_bit_offset(since: Any) -> None:
    resume = parse_resume(since, "e", None)
    assert not isinstance(resume, str)
    assert resume.since == int(since)


def test_an_auth_frame_with_a_huge_since_closes_invalid_token() -> None:
    session = Session(20, 40, 0.0, authenticated_by_request=False)
    frame = json.dumps({"type": "auth", "token": "x.y.z", "since": HUGE, "epoch": "e"})
    action = session.receive(frame, False, 0.0)
    assert isinstance(action, Close) and action.reason.reason == "invalid_token"
    ok = Session(20, 40, 0.0, authenticated_by_request=False).receive(
        json.dumps({"type": "auth", "token": "x.y.z", "since": str(MAX_OFFSET)}), False, 0.0)
    assert isinstance(ok, Authenticate) and ok.resume.since == MAX_OFFSET


async def test_a_huge_since_on_the_upgrade_is_400_bad_resume_before_any_token_check(service: Service) -> None:
    _, did = service.seed.owned()
    for since in (HUGE, str(MAX_OFFSET + 1)):
        async with service.http.get(service.ws_url(did, since=since)) as resp:
            assert resp.status == 400
            body = await resp.json()
        assert body["error"]["code"] == "bad_resume", body


async def test_a_huge_since_in_the_auth_frame_closes_invalid_token(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.open(did, service.tokens.user(uid), "auth_frame", auth_extra={"since": HUGE})
    await client.wait_closed()
    assert (client.close_code, client.close_reason) == (1008, "invalid_token")
    assert not client.of_type("connect")


# -- finding 4: nesting ----------------------------------------------------------------------------------------

def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_depth_counts_without_recursion() -> None:
    assert nesting_depth(1) == 0
    assert nesting_depth({"a": [1, {"b": []}]}) == 4
    assert nesting_depth(nested(10_000), limit=10) == 11  # stops early, no RecursionError
    with pytest.raises(ValueError, match="nests deeper than"):
        PublishRequest.model_validate({"diagnosis_id": 1, "type": "x", "data": nested(MAX_DATA_DEPTH + 1)})
    PublishRequest.model_validate({"diagnosis_id": 1, "type": "x", "data": nested(MAX_DATA_DEPTH)})


async def post(service: Service, path: str, body: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {service.tokens.service()}", "Content-Type": "application/json"}
    async with service.http.post(f"{service.base_url}{path}", data=json.dumps(body), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_deeply_nested_publish_data_is_422_naming_data_and_nothing_is_sent(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    status, body = await post(service, "/api/v1/publish", {"diagnosis_id": did, "type": "deep", "data": nested(300)})
    assert status == 422, body
    assert "data" in body["error"]["fields"], body
    status, body = await post(service, "/api/v1/publish/batch",
                              {"messages": [{"diagnosis_id": did, "type": "ok", "data": {}},
                                            {"diagnosis_id": did, "type": "deep", "data": {"a": nested(300)}}]})
    assert status == 422, body
    assert "messages.1.data" in body["error"]["fields"], body
    # the deepest accepted body is delivered intact
    status, body = await post(service, "/api/v1/publish",
                              {"diagnosis_id": did, "type": "deepest", "data": nested(MAX_DATA_DEPTH)})
    assert status == 200, body
    frame = await client.next_of("deepest")
    assert frame["data"] == nested(MAX_DATA_DEPTH)
    assert not client.of_type("deep") and not client.of_type("ok"), "a refused request broadcast something"
    await client.close()


@pytest.mark.parametrize("field", ["new_data", "old_data"])
async def test_deeply_nested_recommendation_is_422_naming_the_field(service: Service, field: str) -> None:
    _, did = service.seed.owned()
    body: dict[str, Any] = {"diagnosis_id": did, "old_data": {"a": 1}, "new_data": {"a": 2}, "reason": "r"}
    body[field] = {"a": nested(300)}
    status, answer = await post(service, "/ws/broadcast-recommendation-update", body)
    assert status == 422, answer
    assert field in answer["error"]["fields"], answer


# -- finding 8: token claims -----------------------------------------------------------------------------------

def signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def hostile_tokens() -> list[tuple[str, str]]:
    now = int(time.time())
    return [
        ("sub of 5,000 digits", signed({"sub": "9" * 5000, "exp": now + 3600})),
        ("sub beyond bigint", signed({"sub": str(2**63), "exp": now + 3600})),
        ("integer sub beyond bigint", signed({"sub": 2**64, "exp": now + 3600})),
        ("service sub of 5,000 characters", signed({"sub": "s" * 5000, "scope": "realtime:publish",
                                                    "exp": now + 3600})),
        ("exp of 10**400", signed({"sub": "5", "exp": 10**400})),
        ("exp true", signed({"sub": "5", "exp": True})),
        ("exp NaN", signed({"sub": "5", "exp": float("nan")})),
        ("exp Infinity", signed({"sub": "5", "exp": float("inf")})),
        ("exp a string", signed({"sub": "5", "exp": str(now + 3600)})),
        ("nbf true", signed({"sub": "5", "exp": now + 3600, "nbf": True})),
        ("iat of 10**400", signed({"sub": "5", "exp": now + 3600, "iat": 10**400})),
    ]


@pytest.mark.parametrize(("case", "token"), hostile_tokens(), ids=[c for c, _ in hostile_tokens()])
def test_hostile_claims_are_invalid_token(case: str, token: str) -> None:
    verifier = TokenVerifier(("HS256",), SECRET, None, None, None, 0)
    with pytest.raises(InvalidToken):
        verifier.verify(token)


async def test_hostile_claims_are_401_and_invalid_token_over_the_wire(service: Service) -> None:
    _, did = service.seed.owned()
    for case, token in hostile_tokens():
        async with service.http.post(f"{service.base_url}/api/v1/publish", json={"diagnosis_id": did, "type": "x"},
                                     headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 401, case
            assert (await resp.json())["error"]["code"] == "unauthorized", case  # REST's word for it (PROTOCOL 4)
        client = await service.open(did, token, "header")
        await client.wait_closed()
        assert (client.close_code, client.close_reason) == (1008, "invalid_token"), case
