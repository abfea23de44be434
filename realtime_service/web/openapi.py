"""`GET /api/openapi.json`: the OpenAPI 3.1 document, generated from the pydantic models that validate requests.

Request bodies come from the very models the REST handlers validate with, so the document cannot drift from
the code; the read endpoints, whose answers the node builds as plain dicts, get small models here that state
their shape (the tests check live answers against them). The document is built once per app, in `setup`.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from realtime_service import __version__
from realtime_service.protocol.models import (
    BatchRequest,
    BatchResult,
    EffectivenessUpdateRequest,
    ErrorBody,
    FeedbackUpdateRequest,
    PublishRequest,
    PublishResult,
    RecommendationUpdateRequest,
    RevokeRequest,
)
from realtime_service.web.http import raw_json_response

DOCUMENT: web.AppKey[bytes] = web.AppKey("openapi_document", bytes)
REF = "#/components/schemas/{model}"
ERROR_TEXT = {
    400: "Malformed JSON, or a body that is not a JSON object.",
    401: "Missing or bad bearer token.",
    403: "The token may not do this (a user token on a service endpoint, or another user's diagnosis).",
    404: "No such diagnosis.",
    413: "The body is larger than `max_body_bytes`.",
    422: "A field failed validation; `error.fields` names each failing field.",
    503: "The read replica (or the broker) did not answer in time.",
}
BOUND_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
PUBLISH_ERRORS = (400, 401, 403, 404, 413, 422, 503)
SERVICE_READ_ERRORS = (401, 403, 404, 503)


# -- shapes of the answers the node builds as dicts (PROTOCOL 4, "Shapes of the read endpoints") ----------------
class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiagnosisStatus(_Answer):
    """Live numbers of one diagnosis on this node."""

    connections: int
    users: int
    offset: int


class StatusBody(_Answer):
    """`GET /ws/status`: totals; `per_diagnosis` only for a service token."""

    connections: int
    diagnoses: int
    retained_messages: int
    per_diagnosis: dict[str, DiagnosisStatus] | None = Field(
        None, description="Keyed by diagnosis id; present only when the caller used a service token.")


class PresenceUser(_Answer):
    """One user connected to a diagnosis now."""

    user_id: int
    connections: int
    devices: list[str]


class PresenceBody(_Answer):
    """`GET /api/v1/diagnoses/{id}/presence`."""

    diagnosis_id: int
    users: list[PresenceUser]


class DeviceDelivery(_Answer):
    """The confirmed cursor of one (user, device)."""

    user_id: int
    device: str
    confirmed_offset: int
    confirmed_at: str = Field(description="ISO-8601, UTC.")


class DeliveriesBody(_Answer):
    """`GET /api/v1/diagnoses/{id}/deliveries`: did the patient's app get it?"""

    diagnosis_id: int
    offset: int = Field(description="The diagnosis's newest offset.")
    epoch: str
    devices: list[DeviceDelivery]


class RevokeResult(_Answer):
    """`POST /api/v1/diagnoses/{id}/revoke`: how many connections were closed."""

    diagnosis_id: int
    closed: int


class Health(_Answer):
    """`GET /healthz`: the process is alive."""

    status: Literal["ok"]


class Readiness(_Answer):
    """`GET /readyz`: each dependency's state; `down` lists what is not ok."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    down: list[str] | None = None


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    PublishRequest, RecommendationUpdateRequest, EffectivenessUpdateRequest, FeedbackUpdateRequest, BatchRequest,
    RevokeRequest)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    PublishResult, BatchResult, ErrorBody, StatusBody, PresenceBody, DeliveriesBody, RevokeResult, Health, Readiness)


def setup(app: web.Application) -> None:
    """Build the document once, when the app is built, instead of on every request."""
    app[DOCUMENT] = orjson.dumps(build_document())


async def document(request: web.Request) -> web.Response:
    """The OpenAPI document (built at setup; built on the spot only if the app factory skipped `setup`)."""
    body = request.app.get(DOCUMENT)
    if body is None:
        body = orjson.dumps(build_document())
    return raw_json_response(body)


def _schemas() -> dict[str, Any]:
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((m, "validation") for m in REQUEST_MODELS), *((m, "serialization") for m in RESPONSE_MODELS)]
    _keys, top = models_json_schema(pairs, ref_template=REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    return {name: _union_bounds(schema) for name, schema in schemas.items()}


def _union_bounds(node: Any) -> Any:
    """Move bounds that pydantic leaves beside an `anyOf` (`ge`, `le`: not JSON Schema) into its numeric branches.

    `Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)]` validates the bounds but its generated schema carries
    them as unknown keywords, which every client generator and fuzzer would ignore.
    """
    if isinstance(node, list):
        return [_union_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _union_bounds(value) for key, value in node.items()}
    if "anyOf" not in out:
        return out
    bounds = {BOUND_KEYWORDS[key]: out.pop(key) for key in list(out) if key in BOUND_KEYWORDS}
    if bounds:
        out["anyOf"] = [{**branch, **bounds} if branch.get("type") in ("number", "integer") else branch
                        for branch in out["anyOf"]]
    return out


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(status): _json(ErrorBody, ERROR_TEXT[status]) for status in statuses}


IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "description": "A repeat of a key seen in the last 10 minutes from the same caller (token `sub`) "
                              "is not broadcast again; it answers with the first result.",
               "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
DIAGNOSIS_PARAM = {"name": "diagnosis_id", "in": "path", "required": True,
                   "schema": {"type": "integer", "minimum": 1, "maximum": 999_999_999_999_999_999}}


def _publish(summary: str, body: type[BaseModel], result: type[BaseModel], description: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "description": description, "tags": ["publish"],
        "parameters": [IDEMPOTENCY],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {"200": _json(result, "Published: the message has its offset and is in history."),
                      **_errors(PUBLISH_ERRORS)}}}


def _service_read(summary: str, model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "description": description, "tags": ["diagnoses"],
                    "parameters": [DIAGNOSIS_PARAM],
                    "responses": {"200": _json(model, summary), **_errors(SERVICE_READ_ERRORS)}}}


def _paths() -> dict[str, Any]:
    no_auth: list[dict[str, list[str]]] = []
    return {
        "/ws/broadcast-recommendation-update": _publish(
            "Broadcast a recommendation_update", RecommendationUpdateRequest, PublishResult,
            "Builds `recommendation_update` with `changed_fields` (sorted top-level keys that differ)."),
        "/ws/broadcast-effectiveness-update": _publish(
            "Broadcast an effectiveness_update", EffectivenessUpdateRequest, PublishResult,
            "Builds `effectiveness_update`; `improvement` = new - old when `old_effectiveness` is given."),
        "/ws/broadcast-feedback-update": _publish(
            "Broadcast a feedback_update", FeedbackUpdateRequest, PublishResult, "Builds `feedback_update`."),
        "/api/v1/publish": _publish(
            "Publish a message of any type", PublishRequest, PublishResult,
            "Any type matching `^[a-z][a-z0-9_]{0,63}$` except the reserved frame types. With `user_id`, a "
            "personal message for that user only (no offset)."),
        "/api/v1/publish/batch": _publish(
            "Publish up to 1000 messages at once", BatchRequest, BatchResult,
            "Every message is validated and checked first; none is published if one fails."),
        "/ws/status": {"get": {
            "summary": "Connection totals", "tags": ["operations"],
            "description": "Totals for anyone; with a service token also `per_diagnosis`.",
            "security": [{}, {"bearer": []}],
            "responses": {"200": _json(StatusBody, "Totals of this node.")}}},
        "/api/v1/diagnoses/{diagnosis_id}/presence": _service_read(
            "Users connected now", PresenceBody, "Service token: the users connected now and their devices."),
        "/api/v1/diagnoses/{diagnosis_id}/deliveries": _service_read(
            "Confirmed delivery cursors", DeliveriesBody,
            "Service token: per (user, device), the confirmed offset and when it was confirmed."),
        "/api/v1/diagnoses/{diagnosis_id}/revoke": {"post": {
            "summary": "Ownership changed: re-check connections", "tags": ["diagnoses"],
            "description": "Service token. Drops the cached ownership decision and closes `forbidden` the "
                           "connections of `user_id` (or of everyone) that the replica no longer allows.",
            "parameters": [DIAGNOSIS_PARAM],
            "requestBody": {"required": False, "content": {"application/json": {"schema": _ref(RevokeRequest)}}},
            "responses": {"200": _json(RevokeResult, "The connections that were closed."),
                          **_errors(PUBLISH_ERRORS)}}},
        "/healthz": {"get": {
            "summary": "Liveness", "tags": ["operations"], "security": no_auth,
            "responses": {"200": _json(Health, "The process is alive.")}}},
        "/readyz": {"get": {
            "summary": "Readiness", "tags": ["operations"], "security": no_auth,
            "responses": {"200": _json(Readiness, "The replica (and the broker, if any) answer."),
                          "503": _json(Readiness, "Something is down (named in `down`), or the node is draining.")}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics", "tags": ["operations"], "security": no_auth,
            "responses": {"200": {"description": "Prometheus text exposition format 0.0.4.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/openapi.json": {"get": {
            "summary": "This document", "tags": ["operations"], "security": no_auth,
            "responses": {"200": {"description": "OpenAPI 3.1.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    }


def build_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document of PROTOCOL 4 (the WebSocket itself is described in `info`)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "realtime-service",
            "version": __version__,
            "description": (
                "Realtime diagnosis updates beside the main API. The REST API below publishes and inspects; "
                "clients receive frames over the WebSocket `GET /ws/{diagnosis_id}` (first frame "
                "`{\"type\": \"auth\", \"token\": \"<jwt>\"}`, or an `Authorization: Bearer` header), which "
                "OpenAPI cannot describe. Errors always have the shape `ErrorBody`."),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": "publish", "description": "Publish messages to a diagnosis's subscribers."},
                 {"name": "diagnoses", "description": "Per-diagnosis inspection and control (service token)."},
                 {"name": "operations", "description": "Health, readiness, metrics and this document."}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "A service token (scope `realtime:publish`) or, for publishing to one's own "
                               "diagnosis, a user token."}},
        },
    }
