"""HTTP helpers of the adapter: the JSON error envelope, bearer tokens, JSON bodies, the error middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from realtime_service.auth.tokens import Principal
from realtime_service.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    Forbidden,
    HostNotAllowed,
    NotFound,
    ServiceError,
    Unauthorized,
    ValidationFailed,
)
from realtime_service.protocol.models import field_errors
from realtime_service.web.hosts import host_allowed
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


BODY_POLL = 1.0  # seconds between looks at a slow body's progress


async def read_body(request: web.Request, silence: float, deadline: float) -> None:
    """Read the whole body now, so the handler finds it buffered: it must keep coming (no pause longer than
    `silence`) and be complete within `deadline` seconds, else 408 (nginx's client_body_timeout, plus a cap).

    A body that came with its head (nearly every request of the main API) costs no task and no timer.
    """
    content = request.content
    if content.is_eof():
        await request.read()
        return
    loop = asyncio.get_running_loop()
    reading = asyncio.ensure_future(request.read())
    started = last_change = loop.time()
    seen = content.total_bytes
    try:
        while True:
            now = loop.time()
            due = min(last_change + silence, started + deadline)
            if now >= due:
                raise BodyTimeout(f"the request body stopped arriving (no data for {silence:g} s, or not complete "
                                  f"within {deadline:g} s)")
            await asyncio.wait({reading}, timeout=min(BODY_POLL, due - now))
            if reading.done():
                reading.result()
                return
            if content.total_bytes != seen:
                seen, last_change = content.total_bytes, loop.time()
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes the JSON envelope of PROTOCOL 4; unexpected ones are logged, never echoed.

    A client's own fault (a body cut short, a hang-up, a body too slow) is a 4xx and one rate-limited INFO line,
    never an ERROR with a traceback: anyone can cause those.
    """
    state = request.app[STATE]
    edge = state.edge
    if edge.served is not None:
        edge.served(request.protocol)
    try:
        if not host_allowed(request, state.settings, edge.known_hosts):
            raise HostNotAllowed(f"this server does not answer for Host {request.host!r} in development; add it "
                                 "to REALTIME_ALLOWED_HOSTS if it is yours")
        if request.body_exists:
            settings = state.settings
            await read_body(request, settings.http_body_timeout, settings.http_body_deadline)
        response = await handler(request)
    except ServiceError as exc:
        response = json_response(exc.body(), exc.status)
        if isinstance(exc, BodyTimeout):
            state.repeats.info(log, "body_timeout", "closed a request whose body stopped arriving",
                               method=request.method, path=request.rel_url.path, remote=request.remote or "")
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            if request.protocol is not None:
                request.protocol.force_close()  # the body is dead: no lingering read of what never comes
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        response = json_error(exc.status, code, exc.reason)
        if exc.status == 413:
            response.force_close()  # the rest of the body is not worth reading
    except web.RequestPayloadError as exc:
        state.repeats.info(log, "bad_body", "refused a malformed request body: %s", exc, method=request.method,
                           path=request.rel_url.path, remote=request.remote or "")
        response = json_error(400, "bad_request", "the request body is malformed")
        response.force_close()
    except ConnectionError:
        if not _client_gone(request):
            log.exception("unhandled error in %s %s", request.method, request.rel_url.path)
            response = json_error(500, "internal_error", "internal error")
        else:
            state.repeats.info(log, "client_gone", "the client hung up before its request was answered",
                               method=request.method, path=request.rel_url.path, remote=request.remote or "")
            response = json_error(499, "client_closed_request", "the client closed the connection")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.rel_url.path)
        response = json_error(500, "internal_error", "internal error")
    if response.status != 101:
        # the route's pattern, never the raw path: ids must not become label values
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        state.metrics.http_requests.labels(name, f"{response.status // 100}xx").inc()
    return response
