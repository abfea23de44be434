"""PROTOCOL 2: tokens never reach the logs. redact() and the JSON formatter, then a real server's whole output."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from realtime_service.logs import JsonFormatter, redact
from tests.support import Client, Seeder, Tokens
from tests.test_settings_cli import ServerProcess, serve_env

# A JWT-shaped sample, minted at import with a throwaway secret, so no token-looking string is committed.
JWT = jwt.encode({"sub": "456", "exp": 9999999999}, secrets.token_hex(32), algorithm="HS256")
SIGNATURE = JWT.rsplit(".", 1)[1]
JWT_ANYWHERE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


# -- redact() -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "kept"), [
    (f"GET /ws/12?token={JWT}", "GET /ws/12?token=[REDACTED]"),
    (f"GET /ws/12?since=3&token={JWT}&device=phone", "GET /ws/12?since=3&token=[REDACTED]&device=phone"),
    ("GET /ws/12?token=opaque-secret-value", "GET /ws/12?token=[REDACTED]"),
    ("GET /ws/12?device=x&access_token=opaque-secret-value", "GET /ws/12?device=x&access_token=[REDACTED]"),
    ("GET /ws/12?Token=opaque-secret-value", "GET /ws/12?Token=[REDACTED]"),
    (f"Authorization: Bearer {JWT}", "Authorization: Bearer [REDACTED]"),
    ("authorization: bearer opaque-secret-value", "authorization: bearer [REDACTED]"),
    (f"frame {{\"type\": \"auth\", \"token\": \"{JWT}\"}}", "frame {\"type\": \"auth\", \"token\": \"[REDACTED]\"}"),
    (f"verify failed for {JWT} at 10:00", "verify failed for [REDACTED] at 10:00"),
    ("GET /ws/12?since=3&epoch=abc", "GET /ws/12?since=3&epoch=abc"),
    ("nothing secret here", "nothing secret here"),
])
def test_redact(text: str, kept: str) -> None:
    out = redact(text)
    assert out == kept
    assert "opaque-secret-value" not in out
    assert SIGNATURE not in out


def test_redact_jwt_without_signature_part_and_unpadded_pieces() -> None:
    head, body, _ = JWT.split(".")
    assert redact(f"x {head}.{body}. y") == "x [REDACTED] y"


# -- JsonFormatter ------------------------------------------------------------------------------------------

def _record(msg: str, *args: Any, level: int = logging.INFO, exc_info: Any = None, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("realtime.test", level, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_formatter_writes_one_json_line() -> None:
    line = JsonFormatter().format(_record("hello %s\nsecond line", "world", session="s-1", count=3))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "hello world\nsecond line"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "realtime.test"
    assert entry["session"] == "s-1"
    assert entry["count"] == 3
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$", entry["time"])


def test_json_formatter_redacts_message_args_extras_and_exceptions() -> None:
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        exc_info = sys.exc_info()
    line = JsonFormatter().format(_record("request %s", f"/ws/1?token={JWT}", exc_info=exc_info,
                                          path=f"/ws/1?token={JWT}", header=f"Bearer {JWT}"))
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError" in entry["exception"]
    assert entry["path"] == "/ws/1?token=[REDACTED]"
    assert SIGNATURE not in line
    assert JWT_ANYWHERE.search(line) is None


def test_json_formatter_redacts_nested_extra_values() -> None:
    """Redaction lives in the formatter so no call site can forget it, structured extras included."""
    line = JsonFormatter().format(_record("upgrade", headers={"Authorization": f"Bearer {JWT}"},
                                          urls=[f"/ws/1?token={JWT}"]))
    json.loads(line)
    assert SIGNATURE not in line
    assert JWT_ANYWHERE.search(line) is None


# -- a real server's output -----------------------------------------------------------------------------------

@pytest.fixture
async def servers() -> AsyncIterator[list[ServerProcess]]:
    """Servers a test starts; any still running afterwards are killed."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.kill()


async def test_no_token_reaches_the_logs_of_a_real_server(pg_dsn: str, tmp_path: Path,
                                                          servers: list[ServerProcess]) -> None:
    secret = "log-secret-" + "q" * 32
    tokens, seeder = Tokens(secret), Seeder(pg_dsn)
    server = await ServerProcess.start(serve_env(pg_dsn, secret, REALTIME_LOG_LEVEL="DEBUG",
                                                 REALTIME_DRAIN_PERIOD="0.2", REALTIME_SHUTDOWN_GRACE="10"), tmp_path)
    servers.append(server)
    await server.ready()
    uid, did = seeder.owned()
    ws_url = f"ws://127.0.0.1:{server.port}/ws/{did}"
    async with aiohttp.ClientSession() as http:
        header_client = Client(await http.ws_connect(
            ws_url, headers={"Authorization": f"Bearer {tokens.user(uid)}"})).start()
        query_client = Client(await http.ws_connect(f"{ws_url}?token={tokens.user(uid)}&device=mobile")).start()
        frame_client = Client(await http.ws_connect(f"{ws_url}?device=console")).start()
        await frame_client.send({"type": "auth", "token": tokens.user(uid)})
        for client in (header_client, query_client, frame_client):
            await client.wait(lambda c: c.of_type("connect"), "the connect frame")

        async with http.post(f"http://127.0.0.1:{server.port}/api/v1/publish",
                             json={"diagnosis_id": did, "type": "log_check", "data": {}},
                             headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
            assert resp.status == 200, await resp.text()
        for client in (header_client, query_client, frame_client):
            await client.wait(lambda c: c.of_type("log_check"), "the published frame")

        await frame_client.send({"type": "auth", "token": tokens.user(uid, ttl=7200)})  # refresh
        await frame_client.send({"type": "ping"})
        await frame_client.next_of("pong")  # frames are handled in order: the refresh was accepted
        assert not frame_client.closed

        wrong = tokens.encode({"sub": str(uid), "exp": 4102444800}, key="not-the-server-secret-" + "w" * 20)
        refused = Client(await http.ws_connect(f"{ws_url}?token={wrong}")).start()
        assert await refused.wait_closed() == 1008
        assert refused.close_reason == "invalid_token"

        code, _ = await server.terminate(timeout=15)
        for client in (header_client, query_client, frame_client):
            await client.wait_closed()

    output = server.text
    assert code == 0, output
    assert len(tokens.minted) == 6
    for token in tokens.minted:
        assert token not in output
        assert token.rsplit(".", 1)[1] not in output, "a token signature reached the logs"
    assert JWT_ANYWHERE.search(output) is None
    access = [line for line in output.splitlines() if f"/ws/{did}?" in line and "device=mobile" in line]
    assert access, f"no access log line for the ?token= request:\n{output}"
    assert all("token=[REDACTED]" in line for line in access), access
    refused_lines = [line for line in output.splitlines() if f"/ws/{did}?token=" in line]
    assert refused_lines, f"no access log line for the refused request:\n{output}"
    assert all("token=[REDACTED]" in line for line in refused_lines)
