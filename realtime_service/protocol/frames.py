"""Server-to-client frames (PROTOCOL 3.4), encoded once with orjson and shared as bytes by every recipient."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

CONNECT_MESSAGE = "Successfully connected to diagnosis updates"


def utc_now() -> str:
    """ISO-8601 UTC timestamp with milliseconds and a `Z`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(obj: Any) -> bytes:
    """JSON bytes; the one encoder of the service."""
    return orjson.dumps(obj)


def decode(raw: str | bytes) -> Any:
    """Parse JSON; raises ValueError on bad input."""
    return orjson.loads(raw)


def broadcast_body(type_: str, diagnosis_id: int, data: Any, timestamp: str | None = None) -> bytes:
    """A broadcast frame without its position; `with_position` adds offset and epoch once the broker assigns them.

    Splitting it so lets the broker (memory or Redis) place the offset without re-encoding the data.
    """
    return encode({"type": type_, "diagnosis_id": diagnosis_id, "data": data, "timestamp": timestamp or utc_now()})


def with_position(body: bytes, offset: int, epoch: str) -> bytes:
    """Append `offset` and `epoch` to an encoded broadcast body (a JSON object)."""
    return b"%s,\"offset\":%d,\"epoch\":%s}" % (body[:-1], offset, encode(epoch))


def new_message_id() -> str:
    return uuid.uuid4().hex


def personal_frame(type_: str, diagnosis_id: int, user_id: int, data: Any, message_id: str | None = None) -> bytes:
    """A message for one user: no offset, but a unique `message_id`, so a client drops a repeat (PROTOCOL 3.8)."""
    return encode({"type": type_, "message_id": message_id or new_message_id(), "diagnosis_id": diagnosis_id,
                   "user_id": user_id, "data": data, "timestamp": utc_now()})


def connect_frame(diagnosis_id: int, user_id: int, session: str, offset: int, epoch: str) -> bytes:
    return encode({"type": "connect", "diagnosis_id": diagnosis_id,
                   "data": {"user_id": user_id, "session": session, "offset": offset, "epoch": epoch,
                            "message": CONNECT_MESSAGE},
                   "timestamp": utc_now()})


def pong_frame(diagnosis_id: int) -> bytes:
    now = utc_now()
    return encode({"type": "pong", "diagnosis_id": diagnosis_id, "data": {"timestamp": now}, "timestamp": now})


def error_frame(diagnosis_id: int, code: str, message: str) -> bytes:
    return encode({"type": "error", "diagnosis_id": diagnosis_id, "data": {"code": code, "message": message},
                   "timestamp": utc_now()})


# What `reconnect_frame` adds around its messages (type, id, flags, timestamp), rounded up: history is bounded to
# history_max_bytes minus this, so that the whole replay frame stays within history_max_bytes (PROTOCOL 3.7).
REPLAY_OVERHEAD = 192


def replay_size(frame: bytes) -> int:
    """What one message adds to a replay frame: itself and the comma before it."""
    return len(frame) + 1


def reconnect_frame(diagnosis_id: int, messages: list[bytes], recovered: bool) -> bytes:
    """`reconnect_messages` built from already encoded frames, without decoding them again."""
    head = b'{"type":"reconnect_messages","diagnosis_id":%d,"data":{"messages":[' % diagnosis_id
    tail = b'],"recovered":%s},"timestamp":%s}' % (b"true" if recovered else b"false", encode(utc_now()))
    return head + b",".join(messages) + tail
