"""Typed errors of the client: one class per reason an application may want to handle, all under ClientError.

`.reason` is the close reason or the REST error code word (`forbidden`, `validation_error`, ...); `.fields`
names the failing fields of a 422 (or of a body refused before it was sent); `.status` is the HTTP status and
`.close_code` the WebSocket close code, where they apply. Messages never contain a token.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of every error raised by realtime_service.client."""

    def __init__(self, reason: str, message: str = "", *, fields: dict[str, str] | None = None,
                 status: int | None = None, close_code: int | None = None) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message
        self.fields: dict[str, str] = dict(fields or {})
        self.status = status
        self.close_code = close_code


class InvalidToken(ClientError):
    """The token was refused (bad signature, algorithm, claims): retrying with it cannot help."""


class Unauthorized(InvalidToken):
    """REST 401: no token, or one that does not verify."""


class TokenExpired(InvalidToken):
    """The token expired and no callable was given to get a new one."""


class Forbidden(ClientError):
    """The user may not watch or publish to this diagnosis (or a user token on a service-only endpoint)."""


class DiagnosisNotFound(ClientError):
    """No such diagnosis."""


class NotFound(ClientError):
    """REST 404 for something other than a diagnosis (a path)."""


class BadRequest(ClientError):
    """REST 400: the body was not JSON the service could read."""


class PayloadTooLarge(ClientError):
    """REST 413: the body is over the service's limit."""


class ValidationFailed(ClientError):
    """REST 422, or a body refused before it was sent: `.fields` names what failed."""


class IdempotencyKeyReused(ValidationFailed):
    """An Idempotency-Key was reused with another body: a caller's bug, never a retry."""


class ServiceUnavailable(ClientError):
    """The service kept answering 503 (or timing out, or refusing connections) until the retry budget ran out."""


class Refused(ClientError):
    """The service refused the connection in another way (HTTP status before the upgrade, an Origin refused)."""


_BY_REASON: dict[str, type[ClientError]] = {
    "invalid_token": InvalidToken,
    "unauthorized": Unauthorized,
    "token_expired": TokenExpired,
    "forbidden": Forbidden,
    "diagnosis_not_found": DiagnosisNotFound,
    "not_found": NotFound,
    "bad_request": BadRequest,
    "body_too_large": PayloadTooLarge,
    "validation_error": ValidationFailed,
    "idempotency_key_reused": IdempotencyKeyReused,
}
_BY_STATUS: dict[int, type[ClientError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                            413: PayloadTooLarge, 422: ValidationFailed, 503: ServiceUnavailable}


def error_for(reason: str, message: str = "", *, fields: dict[str, str] | None = None,
              status: int | None = None, close_code: int | None = None) -> ClientError:
    """The typed error for a reason word (falling back on the HTTP status, then on ClientError)."""
    cls = _BY_REASON.get(reason) or (_BY_STATUS.get(status) if status is not None else None) or ClientError
    return cls(reason, message, fields=fields, status=status, close_code=close_code)


def error_from_body(status: int, body: Any) -> ClientError:
    """The typed error for an `{"error": {"code", "message", "fields"}}` answer (PROTOCOL 4)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return error_for(f"http_{status}", f"HTTP {status}", status=status)
    raw_fields = error.get("fields")
    fields = {str(k): str(v) for k, v in raw_fields.items()} if isinstance(raw_fields, dict) else None
    return error_for(str(error.get("code") or f"http_{status}"), str(error.get("message") or ""), fields=fields,
                     status=status)
