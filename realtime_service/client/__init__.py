"""The Python client of realtime-service (PROTOCOL 9). It needs only aiohttp (and pydantic, for the request
models it shares with the service); it imports nothing of the server.

    from realtime_service.client import Publisher
    async with Publisher("http://realtime:8080", service_token) as realtime:
        await realtime.broadcast_feedback_update(diagnosis_id, feedback_id=9, rating=5, effectiveness=0.8)

    async for item in subscribe("ws://realtime:8080", diagnosis_id, get_user_token, device="worker-1"):
        if isinstance(item, HistoryLost): refetch()
        else: handle(item)
"""

from realtime_service.client.errors import (
    BadRequest,
    ClientError,
    DiagnosisNotFound,
    Forbidden,
    IdempotencyKeyReused,
    InvalidToken,
    NotFound,
    PayloadTooLarge,
    Refused,
    ServiceUnavailable,
    TokenExpired,
    Unauthorized,
    ValidationFailed,
)
from realtime_service.client.policy import Backoff, CloseAction, close_action, reconnect_delay
from realtime_service.client.publisher import Publisher, RetryBudget
from realtime_service.client.sequence import HistoryLost, Position
from realtime_service.client.subscribe import State, subscribe

__all__ = [
    "Backoff", "BadRequest", "ClientError", "CloseAction", "DiagnosisNotFound", "Forbidden", "HistoryLost",
    "IdempotencyKeyReused", "InvalidToken", "NotFound", "PayloadTooLarge", "Position", "Publisher", "Refused",
    "RetryBudget", "ServiceUnavailable", "State", "TokenExpired", "Unauthorized", "ValidationFailed",
    "close_action", "reconnect_delay", "subscribe",
]
