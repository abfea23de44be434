"""REST request bodies (PROTOCOL 4). The same models validate requests and generate the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

from realtime_service.protocol.changes import changed_fields

RESERVED_TYPES = frozenset({"connect", "pong", "reconnect_messages", "error", "auth", "ping"})
TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
MAX_BATCH = 1000
# orjson serialises at most 254 levels of nesting and a frame wraps `data` in a few more; 64 is far beyond any
# real update and keeps every accepted body serialisable (a deeper one is a 422, not a 500 at broadcast time).
MAX_DATA_DEPTH = 64

PositiveId = Annotated[StrictInt, Field(gt=0, le=2**63 - 1)]
Unit = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)]


def nesting_depth(value: Any, limit: int = MAX_DATA_DEPTH) -> int:
    """How deeply arrays and objects nest in a JSON value (a scalar is 0), counted without recursion.

    Stops counting once past `limit`, so a hostile body costs at most one walk of its containers.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest


def _shallow(value: Any) -> Any:
    if nesting_depth(value) > MAX_DATA_DEPTH:
        raise ValueError(f"nests deeper than {MAX_DATA_DEPTH} levels of arrays and objects")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    exclude_session: StrictStr | None = Field(
        None, description="The `session` of one connection that must not receive this message (its own echo).")


class PublishRequest(_Body):
    """A message of any type for one diagnosis; with `user_id`, a personal message for that user only."""

    diagnosis_id: PositiveId
    type: Annotated[StrictStr, Field(pattern=TYPE_PATTERN, description="Not one of the reserved frame types.")]
    data: Any = Field(default_factory=dict)
    user_id: PositiveId | None = None

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_TYPES:
            raise ValueError(f"type {value!r} is reserved")
        return value

    @field_validator("data")
    @classmethod
    def _not_too_deep(cls, value: Any) -> Any:
        return _shallow(value)

    def frame_type(self) -> str:
        return self.type

    def frame_data(self) -> Any:
        return self.data

    def personal_user(self) -> int | None:
        return self.user_id


class RecommendationUpdateRequest(_Body):
    """Builds a `recommendation_update` frame."""

    diagnosis_id: PositiveId
    old_data: dict[str, Any]
    new_data: dict[str, Any]
    reason: StrictStr

    @field_validator("old_data", "new_data")
    @classmethod
    def _not_too_deep(cls, value: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = _shallow(value)
        return result

    def frame_type(self) -> str:
        return "recommendation_update"

    def frame_data(self) -> dict[str, Any]:
        return {"old_recommendation": self.old_data, "new_recommendation": self.new_data, "reason": self.reason,
                "changed_fields": changed_fields(self.old_data, self.new_data)}

    def personal_user(self) -> int | None:
        return None


class EffectivenessUpdateRequest(_Body):
    """Builds an `effectiveness_update` frame; `improvement` = new - old when old is given."""

    diagnosis_id: PositiveId
    recommendation_id: PositiveId
    new_effectiveness: Unit
    confidence: Unit
    sample_size: Annotated[StrictInt, Field(ge=0)]
    old_effectiveness: Unit | None = None
    herb: StrictStr | None = None

    def frame_type(self) -> str:
        return "effectiveness_update"

    def frame_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"recommendation_id": self.recommendation_id,
                                "new_effectiveness": self.new_effectiveness, "confidence": self.confidence,
                                "sample_size": self.sample_size}
        if self.herb is not None:
            data["herb"] = self.herb
        if self.old_effectiveness is not None:
            data["old_effectiveness"] = self.old_effectiveness
            data["improvement"] = round(self.new_effectiveness - self.old_effectiveness, 12)
        return data

    def personal_user(self) -> int | None:
        return None


class FeedbackUpdateRequest(_Body):
    """Builds a `feedback_update` frame."""

    diagnosis_id: PositiveId
    feedback_id: PositiveId
    rating: Annotated[StrictInt, Field(ge=1, le=5)]
    effectiveness: Unit
    recommendation_id: PositiveId | None = None
    comment: StrictStr | None = None

    def frame_type(self) -> str:
        return "feedback_update"

    def frame_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"feedback_id": self.feedback_id, "rating": self.rating,
                                "effectiveness": self.effectiveness}
        if self.recommendation_id is not None:
            data["recommendation_id"] = self.recommendation_id
        if self.comment is not None:
            data["comment"] = self.comment
        return data

    def personal_user(self) -> int | None:
        return None


class BatchRequest(BaseModel):
    """Up to 1000 publishes, validated together: all are published or none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: Annotated[list[PublishRequest], Field(min_length=1, max_length=MAX_BATCH)]


class RevokeRequest(BaseModel):
    """Ownership changed: re-check one user's connections, or everyone's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: PositiveId | None = None


PublishBody = PublishRequest | RecommendationUpdateRequest | EffectivenessUpdateRequest | FeedbackUpdateRequest


class PublishResult(BaseModel):
    """The answer to one publish."""

    diagnosis_id: int
    offset: int | None = Field(description="Null for a personal message.")
    epoch: str
    delivered: int | None = Field(description="Connections the message was handed to on this node.")


class BatchResult(BaseModel):
    results: list[PublishResult]


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: dict[str, str] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def field_errors(errors: list[dict[str, Any]]) -> dict[str, str]:
    """pydantic errors -> {"messages.3.type": "..."}: the failing fields, named as the client wrote them."""
    out: dict[str, str] = {}
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if not _is_union_tag(p)) or "body"
        out.setdefault(loc, err.get("msg", "invalid"))
    return out


def _is_union_tag(part: Any) -> bool:
    # pydantic names the member of a union it tried ("float", "int") inside `loc`; the client never wrote it.
    return isinstance(part, str) and part in {"float", "int", "str", "bool"}
