"""`realtime-service listen <diagnosis_id>`: the Python client from a terminal, as the README tour uses it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from tests.fixtures_app import Service

WAIT = 15.0


async def start_listen(service: Service, diagnosis_id: int, token: str | None, *args: str
                       ) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_") and k != "USER_TOKEN"}
    if token is not None:
        env["USER_TOKEN"] = token
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "realtime_service", "listen", str(diagnosis_id), "--url", service.base_url, *args,
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def read_line(stream: asyncio.StreamReader | None, contains: str) -> str:
    assert stream is not None
    while True:
        line = (await asyncio.wait_for(stream.readline(), WAIT)).decode()
        assert line, f"the stream ended before a line with {contains!r}"
        if contains in line:
            return line


async def test_listen_prints_frames_and_stops_on_ctrl_c(service: Service) -> None:
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    proc = await start_listen(service, did, token)
    try:
        await read_line(proc.stderr, "live (session")
        connect = json.loads(await read_line(proc.stdout, '"connect"'))
        assert connect["data"]["user_id"] == uid
        await service.publish(did, "lab_result", {"value": 7})
        frame = json.loads(await read_line(proc.stdout, "lab_result"))
        assert (frame["offset"], frame["data"]) == (1, {"value": 7})
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rest = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert token not in rest
    assert "Traceback" not in rest


async def test_listen_prints_the_close_code_and_reason_and_exits_1(service: Service) -> None:
    _uid, did = service.seed.owned()
    stranger = service.tokens.user(service.seed.user())
    for token, expected in (("not-a-jwt", "closed 1008 invalid_token: "), (stranger, "closed 1008 forbidden: ")):
        proc = await start_listen(service, did, token)
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 1
        assert expected in err.decode(), err.decode()
        assert token not in err.decode() + out.decode()
        assert "Traceback" not in err.decode()


async def test_listen_without_a_token_says_how_to_give_one(service: Service) -> None:
    proc = await start_listen(service, 5, None)
    _out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 2
    assert "USER_TOKEN" in err.decode()
    assert "Traceback" not in err.decode()
