"""The REST API for the main API (PROTOCOL 4): publish endpoints and the per-diagnosis read endpoints."""

from __future__ import annotations

import hashlib

import orjson
from aiohttp import web
from pydantic import BaseModel

from realtime_service.auth.tokens import Principal
from realtime_service.errors import ServiceError, ValidationFailed
from realtime_service.protocol.models import (
    BatchRequest,
    EffectivenessUpdateRequest,
    FeedbackUpdateRequest,
    PublishBody,
    PublishRequest,
    RecommendationUpdateRequest,
    RevokeRequest,
)
from realtime_service.web.http import (
    diagnosis_id_of,
    json_response,
    principal_of,
    raw_json_response,
    read_model,
    service_principal,
)
from realtime_service.web.state import STATE

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 200


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed(f"{IDEMPOTENCY_HEADER} must be 1-{MAX_KEY_LENGTH} printable characters",
                               {IDEMPOTENCY_HEADER: "invalid"})
    return key


def _scope(request: web.Request, principal: Principal) -> str:
    """Keys are remembered per caller (the token's `sub`), and per endpoint so that a batch and a single publish
    never answer each other's results."""
    return f"{request.path}|{'service' if principal.is_service else 'user'}:{principal.sub}"


def _fingerprint(body: BaseModel) -> str:
    """What makes two requests "the same publish" for an Idempotency-Key: the validated body, not its spelling."""
    return hashlib.sha256(orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


async def _publish_one(request: web.Request, model: type[PublishBody]) -> web.Response:
    principal = principal_of(request)
    key = _idempotency_key(request)
    body = await read_model(request, model)
    node = request.app[STATE].node

    async def produce() -> bytes:
        await node.check_publish(principal, body)
        result = await node.publish(body)
        return orjson.dumps(result.model_dump())

    return raw_json_response(await node.idempotent(_scope(request, principal), key, _fingerprint(body), produce))


async def publish(request: web.Request) -> web.Response:
    """POST /api/v1/publish."""
    return await _publish_one(request, PublishRequest)


async def broadcast_recommendation(request: web.Request) -> web.Response:
    """POST /ws/broadcast-recommendation-update."""
    return await _publish_one(request, RecommendationUpdateRequest)


async def broadcast_effectiveness(request: web.Request) -> web.Response:
    """POST /ws/broadcast-effectiveness-update."""
    return await _publish_one(request, EffectivenessUpdateRequest)


async def broadcast_feedback(request: web.Request) -> web.Response:
    """POST /ws/broadcast-feedback-update."""
    return await _publish_one(request, FeedbackUpdateRequest)


async def publish_batch(request: web.Request) -> web.Response:
    """POST /api/v1/publish/batch: every message checked first; all published or none."""
    principal = principal_of(request)
    key = _idempotency_key(request)
    batch = await read_model(request, BatchRequest)
    node = request.app[STATE].node

    async def produce() -> bytes:
        for index, message in enumerate(batch.messages):
            try:
                await node.check_publish(principal, message)
            except ServiceError as exc:
                exc.fields = {f"messages.{index}.{k}": v for k, v in exc.fields.items()} or {
                    f"messages.{index}.diagnosis_id": exc.message}
                exc.message = f"messages[{index}]: {exc.message}"
                raise
        results = [(await node.publish(message)).model_dump() for message in batch.messages]
        return orjson.dumps({"results": results})

    return raw_json_response(await node.idempotent(_scope(request, principal), key, _fingerprint(batch), produce))


async def presence(request: web.Request) -> web.Response:
    """GET /api/v1/diagnoses/{id}/presence (service token)."""
    service_principal(request)
    return json_response(await request.app[STATE].node.presence(diagnosis_id_of(request)))


async def deliveries(request: web.Request) -> web.Response:
    """GET /api/v1/diagnoses/{id}/deliveries (service token)."""
    service_principal(request)
    return json_response(await request.app[STATE].node.deliveries(diagnosis_id_of(request)))


async def revoke(request: web.Request) -> web.Response:
    """POST /api/v1/diagnoses/{id}/revoke (service token)."""
    service_principal(request)
    body = await read_model(request, RevokeRequest) if request.can_read_body else RevokeRequest()
    return json_response(await request.app[STATE].node.revoke(diagnosis_id_of(request), body.user_id))


async def status(request: web.Request) -> web.Response:
    """GET /ws/status: totals for anyone, per-diagnosis detail for a service token."""
    detail = False
    if request.headers.get("Authorization"):
        try:
            detail = principal_of(request).is_service
        except ServiceError:
            detail = False
    return json_response(await request.app[STATE].node.status(detail))
