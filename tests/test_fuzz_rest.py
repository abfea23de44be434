"""PROTOCOL 4 under generated input: a stateful schemathesis run from `/api/openapi.json`.

The document the service serves has no OpenAPI links, so this test adds them to its own copy: a publish (any of
the publish endpoints, batch included) leads to the presence, deliveries and revoke of the diagnosis it answered,
and to another publish to it; presence leads to deliveries and revoke. Schemathesis then walks sequences of
calls, positive and negative, mostly with a service token (else the owner's token, another user's, none, or a
forged one); half the generated diagnosis ids are pointed at one that exists, so the walks reach the success
paths.

Checks: no 5xx, every answer within the document (schema and content type), no crash in the service's logs, no
200 beyond the caller's rights (no token or a forged one: never; a user: only a publish to a diagnosis it owns),
and a subscriber of the fuzzed diagnosis received exactly the broadcasts answered 200, in offset order, with no
gap and no duplicate, and was never dropped (revoke leaves an owner connected: the replica still allows it).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.fixtures_app import StartService
from tests.fuzzing import LONG_RUN, budget, edge_services, examples, trap_logs
from tests.support import Seeder, Tokens

REQUEST_TIMEOUT = 5.0
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
PUBLISHERS = ["/api/v1/publish", "/ws/broadcast-recommendation-update", "/ws/broadcast-effectiveness-update",
              "/ws/broadcast-feedback-update"]
PER_DIAGNOSIS = {"presence": ("get", "/api/v1/diagnoses/{diagnosis_id}/presence"),
                 "deliveries": ("get", "/api/v1/diagnoses/{diagnosis_id}/deliveries"),
                 "revoke": ("post", "/api/v1/diagnoses/{diagnosis_id}/revoke")}


@pytest.fixture
async def start_edge_service(pg_dsn: str, tokens: Tokens, seed: Seeder) -> AsyncIterator[StartService]:
    async with edge_services(pg_dsn, tokens, seed) as start:
        yield start


def op_ref(method: str, path: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def with_links(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of the document with the links between operations that share a diagnosis."""
    doc = copy.deepcopy(document)
    paths = doc["paths"]

    def link(source: dict[str, Any], name: str, target: tuple[str, str], value: str) -> None:
        links = source["responses"]["200"].setdefault("links", {})
        links[name] = {"operationRef": op_ref(*target), "parameters": {"path.diagnosis_id": value}}

    for path in PUBLISHERS:
        operation = paths[path]["post"]
        for name, target in PER_DIAGNOSIS.items():
            link(operation, name, target, "$response.body#/diagnosis_id")
        operation["responses"]["200"]["links"]["publish_again"] = {
            "operationRef": op_ref("post", "/api/v1/publish"),
            "requestBody": {"diagnosis_id": "$response.body#/diagnosis_id", "type": "again", "data": {}}}
    batch = paths["/api/v1/publish/batch"]["post"]
    for name, target in PER_DIAGNOSIS.items():
        link(batch, name, target, "$response.body#/results/0/diagnosis_id")
    presence = paths[PER_DIAGNOSIS["presence"][1]]["get"]
    for name in ("deliveries", "revoke"):
        link(presence, name, PER_DIAGNOSIS[name], "$request.path.diagnosis_id")
    revoke = paths[PER_DIAGNOSIS["revoke"][1]]["post"]
    link(revoke, "presence", PER_DIAGNOSIS["presence"], "$request.path.diagnosis_id")
    return doc


def chosen(value: Any) -> bool:
    """Half the generated ids, decided by the id itself: a replayed example is pinned the same way."""
    return isinstance(value, int) and not isinstance(value, bool) and value % 2 == 0


PROTECTED = (*PUBLISHERS, "/api/v1/publish/batch", *(path for _, path in PER_DIAGNOSIS.values()))


def caller_of(case: Any) -> str:
    """Who sends this request: mostly the main API's service token, else a user (the owner or not), no token or a
    forged one; decided by the request itself, so a replayed example is sent the same way."""
    digest = zlib.crc32(repr((case.operation.label, case.body, case.path_parameters, case.query)).encode()) % 10
    return "service" if digest < 6 else ("owner", "other_user", "none", "forged")[digest - 6]


def targets(case: Any) -> set[Any]:
    """The diagnoses a request is about (path, body, batch messages)."""
    found = {(case.path_parameters or {}).get("diagnosis_id")}
    body = case.body if isinstance(case.body, dict) else {}
    found.add(body.get("diagnosis_id"))
    for message in body.get("messages") or [] if isinstance(body.get("messages"), list) else []:
        if isinstance(message, dict):
            found.add(message.get("diagnosis_id"))
    return found - {None}


def allowed(caller: str, case: Any, did: int) -> bool:
    """PROTOCOL 4: a 200 from a protected endpoint needs a valid token; a user token may only publish to a
    diagnosis that user owns (the owner owns `did` only), and never reach the service-only endpoints."""
    path = case.operation.path
    if path not in PROTECTED or caller == "service":
        return True
    if caller in ("none", "forged"):
        return False
    if path in (p for _, p in PER_DIAGNOSIS.values()):
        return False
    return caller == "owner" and targets(case) == {did}


def pin(body: Any, did: int) -> None:
    """Point generated diagnosis ids at the existing diagnosis half of the time (personal targets dropped)."""
    if not isinstance(body, dict):
        return
    for message in [body, *(body.get("messages") or [])]:
        if isinstance(message, dict) and chosen(message.get("diagnosis_id")):
            message["diagnosis_id"] = did
            message.pop("user_id", None)


async def test_stateful_schemathesis_run_finds_no_server_error(start_edge_service: StartService) -> None:
    service = await start_edge_service()
    async with service.http.get(f"{service.base_url}/api/openapi.json") as resp:
        document = await resp.json()
    uid, did = service.seed.owned()
    subscriber = await service.connect(did, service.tokens.user(uid))
    other, _ = service.seed.owned()
    credentials = {"service": service.tokens.service(), "owner": service.tokens.user(uid),
                   "other_user": service.tokens.user(other), "none": "",
                   "forged": service.tokens.encode({"sub": "main-api", "scope": "realtime:publish",
                                                    "exp": int(time.time()) + 3600}, key="forged-" + "f" * 40)}
    callers: dict[str, str] = {}
    caller_counts: Counter[str] = Counter()
    trespass: list[str] = []  # answers 200 that the caller's token must not get
    schema = schemathesis.openapi.from_dict(with_links(document))
    base_url = service.base_url
    deadline = time.monotonic() + budget(25.0)
    statuses: Counter[str] = Counter()
    broadcasts: list[int] = []  # offsets answered 200 on the pinned diagnosis
    lock = threading.Lock()

    class Walk(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            pin(case.body, did)
            if "{diagnosis_id}" in case.operation.path and chosen((case.path_parameters or {}).get("diagnosis_id")):
                case.path_parameters = {**case.path_parameters, "diagnosis_id": did}
            if case.headers and "Idempotency-Key" in case.headers:
                # keys are per caller across endpoints: give each operation its own (test_openapi does the same)
                case.headers["Idempotency-Key"] = f"{case.operation.label} {case.headers['Idempotency-Key']}"[:200]

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            caller = caller_of(case)
            callers[case.id] = caller
            caller_counts[caller] += 1
            headers = {"Authorization": f"Bearer {credentials[caller]}"} if credentials[caller] else {}
            return {"base_url": base_url, "headers": headers, "timeout": REQUEST_TIMEOUT}

        def call(self, case: Any, **kwargs: Any) -> Any:
            if time.monotonic() > deadline:  # the budget is spent: answer without sending (counted apart)
                statuses["not sent"] += 1
                kwargs["base_url"] = base_url
                case.method, case.path, case.body = "GET", "/healthz", None
                case.path_parameters, case.query = {}, {}
            return super().call(case, **kwargs)

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)
            with lock:
                statuses[f"{case.operation.label} {response.status_code}"] += 1
                caller = callers.pop(case.id, "service")
                if response.status_code == 200 and not allowed(caller, case, did):
                    trespass.append(f"{caller} got 200 from {case.operation.label} with {case.body!r:.200}")
                if response.status_code == 200 and case.operation.path in (*PUBLISHERS, "/api/v1/publish/batch"):
                    body = response.json()
                    results = body.get("results", [body])
                    broadcasts.extend(r["offset"] for r in results
                                      if r.get("diagnosis_id") == did and r.get("offset") is not None)

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None,
                                   recorder=self.recorder)

    # CI: a derandomized run (the same walks every time); a long run (REALTIME_FUZZ_EXAMPLES) explores afresh
    run_settings = settings(max_examples=examples(80), stateful_step_count=8, deadline=None, database=None,
                            derandomize=not LONG_RUN, phases=[Phase.generate], report_multiple_bugs=False,
                            suppress_health_check=list(HealthCheck))
    with trap_logs() as trap:
        await asyncio.to_thread(Walk.run, settings=run_settings)
        sent = sum(n for label, n in statuses.items() if label != "not sent")
        assert sent >= 100, f"the walks sent too few requests: {statuses}"
        assert any(label.endswith(" 200") and "publish" in label for label in statuses), statuses
        assert any(label.startswith(("GET /api/v1/diagnoses", "POST /api/v1/diagnoses")) and label.endswith(" 200")
                   for label in statuses), f"no walk reached a per-diagnosis operation with success: {statuses}"
        # every broadcast answered 200 reached the subscriber, in order, once
        newest = max(broadcasts, default=0)
        if newest:
            await subscriber.wait_offset(newest)
        received = subscriber.offsets()
        assert received == sorted(set(received)), "duplicates or disorder at the subscriber"
        assert set(broadcasts) == set(received), (f"answered 200 but not delivered: {set(broadcasts) - set(received)}"
                                                  f"; delivered, never answered 200: {set(received) - set(broadcasts)}")
        assert not trespass, f"{len(trespass)} answer(s) beyond the caller's rights: {trespass[:5]}"
        assert set(credentials) <= set(caller_counts), f"some callers were never tried: {caller_counts}"
        assert received == list(range(1, newest + 1)), "a gap in the subscriber's offsets"
        assert not subscriber.closed, f"the subscriber was dropped ({subscriber.close_code})"
        async with service.http.get(f"{base_url}/healthz") as resp:
            assert resp.status == 200
    await subscriber.close()
    trap.assert_clean()
    print(f"\nREST stateful fuzzer: {sent} requests; {sum(1 for s in statuses if s.endswith(' 200'))} operations"
          f" answered 200; {len(broadcasts)} broadcasts delivered; callers {dict(caller_counts)}")
