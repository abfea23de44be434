"""`GET /api/openapi.json` (PROTOCOL 4): a valid OpenAPI document of every route, which the live service obeys."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from realtime_service.web.openapi import build_document
from tests.fixtures_app import Service, StartService

UNDOCUMENTED = ("/ws/{diagnosis_id}", "/console", "/client/")  # the WebSocket upgrade, the console's
# own pages, and the browser client's files (PROTOCOL 9)
PROTOCOL_SECTION_4 = {
    ("post", "/ws/broadcast-recommendation-update"), ("post", "/ws/broadcast-effectiveness-update"),
    ("post", "/ws/broadcast-feedback-update"), ("post", "/api/v1/publish"), ("post", "/api/v1/publish/batch"),
    ("get", "/ws/status"), ("get", "/api/v1/diagnoses/{diagnosis_id}/presence"),
    ("get", "/api/v1/diagnoses/{diagnosis_id}/deliveries"), ("post", "/api/v1/diagnoses/{diagnosis_id}/revoke"),
    ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"), ("get", "/api/openapi.json")}
FUZZ_EXAMPLES = 50
FUZZ_BUDGET = 40.0  # seconds for the whole schemathesis run; examples past it are not sent
REQUEST_TIMEOUT = 5.0


async def fetch_document(service: Service) -> dict[str, Any]:
    async with service.http.get(f"{service.base_url}/api/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        document: dict[str, Any] = await resp.json()
        return document


def conforms(document: dict[str, Any], model: str, body: Any) -> None:
    """Validate one answer against a component schema of the document, following its $refs."""
    registry: Registry[Any] = Registry().with_resource(
        "urn:realtime", Resource.from_contents(document, default_specification=DRAFT202012))
    validator = Draft202012Validator({"$ref": f"urn:realtime#/components/schemas/{model}"}, registry=registry)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, f"{model}: {errors} in {body}"


async def test_document_is_valid_openapi_and_built_once(service: Service) -> None:
    document = await fetch_document(service)
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": document["components"]["securitySchemes"]["bearer"]["description"]}
    assert document == build_document()
    assert await fetch_document(service) == document


async def test_every_route_is_documented_with_bodies_and_errors(service: Service) -> None:
    document = await fetch_document(service)
    routes = {(route.method.lower(), resource.canonical) for resource in service.app.router.resources()
              for route in resource if route.method != "HEAD"
              and not resource.canonical.startswith(UNDOCUMENTED)}
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    assert documented == PROTOCOL_SECTION_4
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "post":
                body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert body.split("/")[-1] in schemas, (path, body)
                for status in ("400", "401", "403", "404", "413", "422", "503"):
                    ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorBody", (path, status)
            assert "200" in operation["responses"], path
    publish = document["paths"]["/api/v1/publish"]["post"]["responses"]["200"]
    assert publish["content"]["application/json"]["schema"]["$ref"].endswith("/PublishResult")
    batch = document["paths"]["/api/v1/publish/batch"]["post"]["responses"]["200"]
    assert batch["content"]["application/json"]["schema"]["$ref"].endswith("/BatchResult")
    unit = schemas["FeedbackUpdateRequest"]["properties"]["effectiveness"]
    assert all(branch["minimum"] == 0 and branch["maximum"] == 1 for branch in unit["anyOf"]), unit


async def test_live_answers_match_the_document(service: Service) -> None:
    document = await fetch_document(service)
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid), device="phone")
    auth = {"Authorization": f"Bearer {service.tokens.service()}"}
    base = service.base_url
    conforms(document, "PublishResult", await service.publish(did, "note", {"n": 1}))
    await client.next_of("note")
    await client.send({"type": "ack", "offset": 1})
    calls: list[tuple[str, str, str, Any, int]] = [
        ("get", "/ws/status", "StatusBody", None, 200),
        ("get", f"/api/v1/diagnoses/{did}/presence", "PresenceBody", None, 200),
        ("get", f"/api/v1/diagnoses/{did}/deliveries", "DeliveriesBody", None, 200),
        ("post", "/api/v1/publish/batch", "BatchResult",
         {"messages": [{"diagnosis_id": did, "type": "a"}, {"diagnosis_id": did, "type": "b", "user_id": uid}]},
         200),
        ("post", f"/api/v1/diagnoses/{did}/revoke", "RevokeResult", {}, 200),
        ("get", "/healthz", "Health", None, 200),
        ("get", "/readyz", "Readiness", None, 200),
        ("post", "/api/v1/publish", "ErrorBody", {"diagnosis_id": did, "type": "connect"}, 422),
        ("get", f"/api/v1/diagnoses/{service.seed.unknown()}/presence", "ErrorBody", None, 404),
    ]
    for method, path, model, body, status in calls:
        async with service.http.request(method, base + path, json=body, headers=auth) as resp:
            assert resp.status == status, (path, await resp.text())
            conforms(document, model, await resp.json())
    async with service.http.get(f"{base}/api/v1/diagnoses/{did}/deliveries", headers=auth) as resp:
        devices = (await resp.json())["devices"]
    assert [(d["user_id"], d["device"], d["confirmed_offset"]) for d in devices] == [(uid, "phone", 1)]
    await client.close()


def _pin_diagnosis(did: int) -> Any:
    """Point a generated publish body at a diagnosis that exists, so the fuzzer reaches the success path too."""

    def pin(case: Any) -> Any:
        body = case.body
        if isinstance(body, dict):
            if isinstance(body.get("diagnosis_id"), int):
                body["diagnosis_id"] = did
            for message in body.get("messages") or []:
                if isinstance(message, dict) and isinstance(message.get("diagnosis_id"), int):
                    message["diagnosis_id"] = did
                    message.pop("user_id", None)
        return case

    return pin


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def fuzz_operation(label: str, cases: Any, base_url: str, headers: dict[str, str], deadline: float
                   ) -> Counter[int]:
    """Send up to FUZZ_EXAMPLES generated requests of one operation, checking each answer; counts the statuses."""
    statuses: Counter[int] = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        if case.headers and "Idempotency-Key" in case.headers:
            # Keys are per caller, not per endpoint: the same key on another endpoint would replay an answer of
            # another shape (reported), so each operation gets keys of its own.
            case.headers["Idempotency-Key"] = f"{label} {case.headers['Idempotency-Key']}"[:200]
        response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS,
                                          timeout=REQUEST_TIMEOUT)
        statuses[response.status_code] += 1

    run()
    return statuses


def fuzz(document: dict[str, Any], base_url: str, token: str, did: int) -> dict[str, Counter[int]]:
    """Run schemathesis against every operation (blocking: call it in a thread); statuses per operation."""
    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + FUZZ_BUDGET
    sent: dict[str, Counter[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE))
        if "{diagnosis_id}" in operation.path:
            cases = st.one_of(cases, operation.as_strategy(path_parameters={"diagnosis_id": did}))
        elif operation.method == "post":
            cases = st.one_of(cases, cases.map(_pin_diagnosis(did)))
        label = f"{operation.method.upper()} {operation.path}"
        sent[label] = fuzz_operation(label, cases, base_url, headers, deadline)
    return sent


async def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(
        start_service: StartService) -> None:
    service = await start_service()
    document = await fetch_document(service)
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    sent = await asyncio.to_thread(fuzz, document, service.base_url, service.tokens.service(), did)
    assert set(sent) == {f"{m.upper()} {p}" for p, item in document["paths"].items() for m in item}
    # Operations without parameters or a body have one distinct request; the others must get a real run.
    starved = {label: statuses.total() for label, statuses in sent.items()
               if statuses.total() < (10 if "{" in label or "POST" in label else 1)}
    assert not starved, f"the time budget left operations nearly untested: {starved}"
    for label in ("POST /api/v1/publish", "POST /ws/broadcast-feedback-update", "POST /api/v1/publish/batch"):
        assert sent[label][200], (label, sent[label])  # the success path was reached
        assert sent[label][422], (label, sent[label])  # and validation refusals
    assert not client.closed, "a subscriber of the fuzzed diagnosis was dropped"
    await client.close()


@pytest.mark.parametrize("path", ["/api/openapi.json", "/healthz", "/metrics"])
async def test_operational_routes_need_no_token(service: Service, path: str) -> None:
    async with service.http.get(service.base_url + path) as resp:
        assert resp.status == 200
