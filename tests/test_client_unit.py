"""Pure parts of the Python client: the ordering rules (Sequencer) and the mapping of answers to typed errors.
The close-code table and the backoff schedule are in tests/test_client_browser.py, beside the browser module's
copy of them, so the two libraries are held to one table."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from realtime_service.client import errors
from realtime_service.client.sequence import HistoryLost, Position, Resume, Sequencer


def connect(offset: int, epoch: str = "e1") -> dict[str, Any]:
    return {"type": "connect", "diagnosis_id": 5, "data": {"offset": offset, "epoch": epoch, "session": "s"}}


def b(offset: int, epoch: str = "e1") -> dict[str, Any]:
    return {"type": "note", "diagnosis_id": 5, "data": {}, "timestamp": "t", "offset": offset, "epoch": epoch}


def p(message_id: str | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "nudge", "diagnosis_id": 5, "user_id": 9, "data": {}, "timestamp": "t"}
    if message_id is not None:
        frame["message_id"] = message_id
    return frame


def replay(messages: list[dict[str, Any]], recovered: bool = True) -> dict[str, Any]:
    return {"type": "reconnect_messages", "diagnosis_id": 5, "data": {"messages": messages, "recovered": recovered}}


def feed(seq: Sequencer, *frames: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for frame in frames:
        out.extend(seq.feed(frame))
    return out


def label(items: list[Any]) -> list[Any]:
    return ["lost" if isinstance(i, HistoryLost) else i.get("offset", i.get("message_id")) for i in items]


def test_first_connection_takes_the_cursor_replay_then_live_without_duplicates() -> None:
    seq = Sequencer(5)
    assert seq.connecting() is None
    items = feed(seq, connect(7), replay([b(6), b(7), p("m1")]), b(7), b(8), b(8))
    assert label(items) == [6, 7, "m1", 8]
    assert seq.position == Position(8, "e1")
    assert seq.connecting() == Position(8, "e1")  # the next connection resumes from here


def test_resume_drops_what_was_handed_over_and_keeps_order() -> None:
    seq = Sequencer(5, Position(3, "e1"))
    assert seq.connecting() == Position(3, "e1")
    items = feed(seq, connect(5), replay([b(2), b(3), b(4), b(5)]), b(5), b(6))
    assert label(items) == [4, 5, 6]


def test_lost_history_comes_first_and_the_new_epoch_is_taken_whole() -> None:
    seq = Sequencer(5, Position(9, "old"))
    seq.connecting()
    items = feed(seq, connect(2, "new"), replay([b(1, "new"), b(2, "new")], recovered=False), b(3, "new"))
    assert label(items) == ["lost", 1, 2, 3]
    lost = items[0]
    assert (lost.offset, lost.epoch, lost.previous) == (2, "new", Position(9, "old"))
    assert seq.position == Position(3, "new")


def test_lost_history_with_nothing_retained_moves_to_the_connect_position() -> None:
    seq = Sequencer(5, Position(9, "old"))
    seq.connecting()
    assert label(feed(seq, connect(4, "new"), replay([], recovered=False))) == ["lost"]
    assert seq.position == Position(4, "new")


@pytest.mark.parametrize(("live", "why"), [(b(7), "gap"), (b(6, "other"), "epoch_changed")])
def test_a_gap_or_another_epoch_live_asks_for_a_resume(live: dict[str, Any], why: str) -> None:
    seq = Sequencer(5)
    seq.connecting()
    feed(seq, connect(5))
    with pytest.raises(Resume, match=why):
        seq.feed(live)
    assert seq.position == Position(5, "e1")  # nothing after the gap was handed over


def test_personal_repeats_are_dropped_by_message_id_across_connections() -> None:
    seq = Sequencer(5)
    seq.connecting()
    first = feed(seq, connect(0), p("m1"), p("m1"), p(None), p(None))
    seq.connecting()
    second = feed(seq, connect(0), replay([p("m1"), p("m2")]), p("m2"))
    assert label(first) == ["m1", None, None]  # without an id nothing can be told apart: all handed over
    assert label(second) == ["m2"]


def test_control_frames_are_not_handed_over() -> None:
    seq = Sequencer(5)
    seq.connecting()
    frames = [connect(0), {"type": "pong", "data": {}}, {"type": "error", "data": {"code": "x", "message": "y"}}]
    assert feed(seq, *frames) == []


@pytest.mark.parametrize(("status", "body", "kind", "reason"), [
    (422, {"error": {"code": "validation_error", "message": "bad", "fields": {"rating": "too big"}}},
     errors.ValidationFailed, "validation_error"),
    (422, {"error": {"code": "idempotency_key_reused", "message": "another body"}}, errors.IdempotencyKeyReused,
     "idempotency_key_reused"),
    (401, {"error": {"code": "unauthorized", "message": "no"}}, errors.Unauthorized, "unauthorized"),
    (401, {"error": {"code": "token_expired", "message": "old"}}, errors.TokenExpired, "token_expired"),
    (403, {"error": {"code": "forbidden", "message": "no"}}, errors.Forbidden, "forbidden"),
    (404, {"error": {"code": "diagnosis_not_found", "message": "no"}}, errors.DiagnosisNotFound,
     "diagnosis_not_found"),
    (413, {"error": {"code": "body_too_large", "message": "big"}}, errors.PayloadTooLarge, "body_too_large"),
    (400, {"error": {"code": "bad_request", "message": "json"}}, errors.BadRequest, "bad_request"),
    (418, {"error": {"code": "teapot", "message": "?"}}, errors.ClientError, "teapot"),
    (409, "not json", errors.ClientError, "http_409"),
])
def test_answers_map_to_typed_errors(status: int, body: Any, kind: type[errors.ClientError], reason: str) -> None:
    error = errors.error_from_body(status, body)
    assert type(error) is kind
    assert isinstance(error, errors.ClientError)
    assert (error.reason, error.status) == (reason, status)
    if kind is errors.ValidationFailed:
        assert error.fields == {"rating": "too big"}


CLIENT = Path(__file__).resolve().parent.parent / "realtime_service" / "client"
ALLOWED_PROJECT_IMPORTS = ("realtime_service.client", "realtime_service.protocol.models")


def test_the_client_imports_aiohttp_and_the_shared_models_only() -> None:
    """An app installs the client without running the server: the package never imports the server's code."""
    for path in sorted(CLIENT.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("realtime_service"):
                    assert name.startswith(ALLOWED_PROJECT_IMPORTS), f"{path.name} imports {name}"
                if name.split(".")[0] == "aiohttp":
                    assert not name.startswith("aiohttp.web"), f"{path.name} imports the server side: {name}"


def test_importing_the_client_loads_none_of_the_server() -> None:
    code = ("import sys, realtime_service.client, realtime_service.client.listen; "
            "print(sorted(m for m in sys.modules if m.startswith(('realtime_service', 'aiohttp.web'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = ast.literal_eval(result.stdout.strip())
    server = [m for m in loaded if not m.startswith(("realtime_service.client", "realtime_service.protocol"))
              and m != "realtime_service"]
    assert server == [], server  # neither the service's modules nor aiohttp's server side
