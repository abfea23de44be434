"""`Publisher(base_url, token)`: the main API's side of PROTOCOL 4, with safe retries (PROTOCOL 9).

Every logical publish gets one `Idempotency-Key`, reused on each retry (a timeout, a connection error, a 502,
503 or 504), so a publish whose answer was lost is never broadcast twice: the service answers the retry with the
first result. Retries back off with full jitter and stop at a budget (attempts and seconds). Bodies are built
and checked with the service's own pydantic models before they leave, and 4xx answers raise typed errors naming
the fields.
"""

from __future__ import annotations

import asyncio
import random as _random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from realtime_service.client.errors import ServiceUnavailable, ValidationFailed, error_from_body
from realtime_service.client.policy import PUBLISH_BACKOFF, Backoff, backoff_delay
from realtime_service.protocol.models import (
    BatchRequest,
    EffectivenessUpdateRequest,
    FeedbackUpdateRequest,
    PublishRequest,
    RecommendationUpdateRequest,
    field_errors,
)

M = TypeVar("M", bound=BaseModel)
TokenSource = str | Callable[[], str | Awaitable[str]]
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_RETRY_AFTER = 10.0


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """At most `attempts` tries of one publish within `seconds` overall; each try times out after `timeout`."""

    attempts: int = 5
    seconds: float = 30.0
    timeout: float = 10.0
    backoff: Backoff = PUBLISH_BACKOFF


def _model(cls: type[M], values: Mapping[str, Any]) -> M:
    try:
        return cls.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        fields = field_errors([dict(e) for e in exc.errors()])
        raise ValidationFailed("validation_error", "invalid body: " + ", ".join(sorted(fields)),
                               fields=fields) from None


class Publisher:
    """Publish to the realtime service. Use as `async with Publisher(url, token) as rt:` or call close()."""

    def __init__(self, base_url: str, token: TokenSource, *, session: aiohttp.ClientSession | None = None,
                 budget: RetryBudget = RetryBudget(), random: Callable[[], float] = _random.random) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._session = session
        self._own_session = session is None
        self.budget = budget
        self._random = random

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the endpoints ------------------------------------------------------------------------------------
    async def publish(self, diagnosis_id: int, type: str, data: Any = None, *,
                      user_id: int | None = None, exclude_session: str | None = None,
                      idempotency_key: str | None = None) -> dict[str, Any]:
        """`POST /api/v1/publish`: a message of any type; with `user_id`, only for that user (3.8)."""
        body = _model(PublishRequest, {"diagnosis_id": diagnosis_id, "type": type,
                                       "data": {} if data is None else data, "user_id": user_id,
                                       "exclude_session": exclude_session})
        return await self._post("/api/v1/publish", body, idempotency_key)

    async def publish_batch(self, messages: Sequence[PublishRequest | Mapping[str, Any]], *,
                            idempotency_key: str | None = None) -> dict[str, Any]:
        """`POST /api/v1/publish/batch`: up to 1000 messages, all published or none."""
        items = [m.model_dump(exclude_none=True) if isinstance(m, BaseModel) else dict(m) for m in messages]
        body = _model(BatchRequest, {"messages": items})
        return await self._post("/api/v1/publish/batch", body, idempotency_key)

    async def broadcast_recommendation_update(self, diagnosis_id: int, old_data: dict[str, Any],
                                              new_data: dict[str, Any], reason: str, *,
                                              exclude_session: str | None = None,
                                              idempotency_key: str | None = None) -> dict[str, Any]:
        """`POST /ws/broadcast-recommendation-update` (the service computes `changed_fields`)."""
        body = _model(RecommendationUpdateRequest, {"diagnosis_id": diagnosis_id, "old_data": old_data,
                                                    "new_data": new_data, "reason": reason,
                                                    "exclude_session": exclude_session})
        return await self._post("/ws/broadcast-recommendation-update", body, idempotency_key)

    async def broadcast_effectiveness_update(self, diagnosis_id: int, recommendation_id: int,
                                             new_effectiveness: float, confidence: float, sample_size: int, *,
                                             old_effectiveness: float | None = None, herb: str | None = None,
                                             exclude_session: str | None = None,
                                             idempotency_key: str | None = None) -> dict[str, Any]:
        """`POST /ws/broadcast-effectiveness-update` (the service computes `improvement`)."""
        body = _model(EffectivenessUpdateRequest, {
            "diagnosis_id": diagnosis_id, "recommendation_id": recommendation_id,
            "new_effectiveness": new_effectiveness, "confidence": confidence, "sample_size": sample_size,
            "old_effectiveness": old_effectiveness, "herb": herb, "exclude_session": exclude_session})
        return await self._post("/ws/broadcast-effectiveness-update", body, idempotency_key)

    async def broadcast_feedback_update(self, diagnosis_id: int, feedback_id: int, rating: int,
                                        effectiveness: float, *, recommendation_id: int | None = None,
                                        comment: str | None = None, exclude_session: str | None = None,
                                        idempotency_key: str | None = None) -> dict[str, Any]:
        """`POST /ws/broadcast-feedback-update`."""
        body = _model(FeedbackUpdateRequest, {
            "diagnosis_id": diagnosis_id, "feedback_id": feedback_id, "rating": rating,
            "effectiveness": effectiveness, "recommendation_id": recommendation_id, "comment": comment,
            "exclude_session": exclude_session})
        return await self._post("/ws/broadcast-feedback-update", body, idempotency_key)

    # -- transport ------------------------------------------------------------------------------------------
    async def _bearer(self) -> str:
        value = self._token() if callable(self._token) else self._token
        if not isinstance(value, str):
            value = await value
        return value

    async def _post(self, path: str, body: BaseModel, idempotency_key: str | None) -> dict[str, Any]:
        """POST with one Idempotency-Key for every try; retry what may not have been answered."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        payload = body.model_dump_json(exclude_none=True).encode()
        key = idempotency_key or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget.seconds
        attempt = 0
        while True:
            headers = {"Authorization": f"Bearer {await self._bearer()}", "Content-Type": "application/json",
                       "Idempotency-Key": key}
            wait: float | None = None
            failure: str
            try:
                timeout = aiohttp.ClientTimeout(total=max(0.1, min(self.budget.timeout, deadline - loop.time())))
                async with self._session.post(self.base_url + path, data=payload, headers=headers,
                                              timeout=timeout) as resp:
                    answer: Any = await resp.json(content_type=None)
                    if resp.status == 200 and isinstance(answer, dict):
                        return answer
                    if resp.status not in RETRY_STATUSES:
                        raise error_from_body(resp.status, answer)
                    failure = f"HTTP {resp.status}"
                    wait = _retry_after(resp.headers.get("Retry-After"))
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                failure = type(exc).__name__
            except ValueError:  # an answer that is not JSON (a proxy's error page): retry like a 502
                failure = "unreadable answer"
            attempt += 1
            delay = wait if wait is not None else backoff_delay(attempt - 1, self.budget.backoff, self._random)
            if attempt >= self.budget.attempts or loop.time() + delay >= deadline:
                raise ServiceUnavailable("service_unavailable",
                                         f"{path} failed {attempt} time(s), last: {failure}", status=None)
            await asyncio.sleep(delay)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        return None
