"""`realtime-service listen <diagnosis_id>`: follow a diagnosis from a terminal with the Python client.

Each frame the client hands over (and the `connect` frame) is printed as one JSON line on stdout; connection
changes go to stderr. A close that ends the subscription prints `closed <code> <reason>: <message>` and exits 1.
The token comes from --token or $USER_TOKEN and is never printed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from realtime_service.client.errors import ClientError
from realtime_service.client.sequence import HistoryLost
from realtime_service.client.subscribe import State, subscribe

DEFAULT_URL = "http://127.0.0.1:8080"


def _line(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def follow(url: str, diagnosis_id: int, token: str, device: str, out: TextIO, err: TextIO) -> int:
    """Print until the subscription ends; the exit status (0 never comes: it runs until stopped or refused)."""

    def on_state(state: State) -> None:
        if state.state == "connecting" and state.attempt == 0:
            print(f"connecting to {url} (diagnosis {diagnosis_id}, device {device})", file=err, flush=True)
        elif state.state == "live":
            print(f"live (session {state.session})", file=err, flush=True)
        elif state.state == "reconnecting":
            print(f"closed {state.code} {state.reason or '-'}; reconnecting in {state.delay:.1f}s", file=err,
                  flush=True)

    def on_frame(direction: str, frame: dict[str, Any]) -> None:
        if direction == "in" and frame.get("type") == "connect":
            print(_line(frame), file=out, flush=True)

    try:
        async for item in subscribe(url, diagnosis_id, token, device, on_state=on_state, on_frame=on_frame):
            if isinstance(item, HistoryLost):
                print(f"history lost (recovered: false): the diagnosis is now at offset {item.offset} of epoch "
                      f"{item.epoch}; an app would refetch its state now", file=err, flush=True)
            else:
                print(_line(item), file=out, flush=True)
    except ClientError as exc:
        code = exc.close_code if exc.close_code is not None else exc.status
        print(f"closed {code if code is not None else '-'} {exc.reason}: {exc.message}", file=err, flush=True)
        return 1
    return 0


def listen(url: str, diagnosis_id: int, token: str, device: str = "cli") -> int:
    """Run `follow` until Ctrl-C (exit 0) or a close that ends it (exit 1)."""
    try:
        return asyncio.run(follow(url, diagnosis_id, token, device, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        print("closed by you", file=sys.stderr)
        return 0
