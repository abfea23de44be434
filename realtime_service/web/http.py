"""HTTP helpers of the adapter: the JSON error envelope, bearer tokens, JSON bodies, the error middleware."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from realtime_service.auth.tokens import Principal
from realtime_service.errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    NotFound,
    ServiceError,
    Unauthorized,
    ValidationFailed,
)
from realtime_service.protocol.models import field_errors
from realtime_service.web.state import STATE

log = logging.getLogger("realtime.http")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def raw_json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def json_error(status: int, code: str, message: str, fields: dict[str, str] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if fields:
        error["fields"] = fields
    return json_response({"error": error}, status)


MAX_ID = 2**63 - 1


def diagnosis_id_of(request: web.Request) -> int:
    """The path's diagnosis id; ids beyond bigint cannot exist (404)."""
    value = int(request.match_info["diagnosis_id"])
    if value > MAX_ID:
        raise NotFound(f"no diagnosis {value}")
    return value


def request_token(request: web.Request, allow_query: bool = False) -> str | None:
    """The bearer token of the Authorization header, else (WebSocket only) the `token` query parameter."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return "" if not allow_query else (request.query.get("token") or "")
    if allow_query:
        return request.query.get("token") or None
    return None


def principal_of(request: web.Request) -> Principal:
    """Verify the caller's bearer token: 401 when missing or bad."""
    token = request_token(request)
    if not token:
        raise Unauthorized("a bearer token is required (Authorization: Bearer <jwt>)")
    try:
        return request.app[STATE].node.verify(token)
    except ServiceError as exc:
        raise Unauthorized(exc.message) from None


def service_principal(request: web.Request) -> Principal:
    """A service token (scope realtime:publish): 401 without a token, 403 with a user token."""
    principal = principal_of(request)
    if not principal.is_service:
        raise Forbidden("this endpoint needs a service token")
    return principal


async def read_json(request: web.Request) -> Any:
    limit = request.app[STATE].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"the body is larger than {limit} bytes") from None
    if len(raw) > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.msg} at position {exc.pos}") from None


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body: 400 for malformed JSON, 422 naming the failing fields."""
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = field_errors(exc.errors(include_url=False))  # type: ignore[arg-type]
        raise ValidationFailed("invalid body: " + ", ".join(sorted(fields)), fields) from None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes the JSON envelope of PROTOCOL 4; unexpected ones are logged, never echoed."""
    try:
        response = await handler(request)
    except ServiceError as exc:
        response = json_response(exc.body(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        response = json_error(exc.status, code, exc.reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.rel_url.path)
        response = json_error(500, "internal_error", "internal error")
    if response.status != 101:
        # the route's pattern, never the raw path: ids must not become label values
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[STATE].metrics.http_requests.labels(name, f"{response.status // 100}xx").inc()
    return response
