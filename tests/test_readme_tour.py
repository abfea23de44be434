"""The README's tour, run as written: `dev`, the pasted `export` lines, `listen`, `curl`, the mistakes.

The commands are read from the README (between the tour markers) and run with bash in a fresh folder whose
`.venv` is this checkout's. One change only: the port. The tour says 8080, which another program on a shared
machine may hold, so the test gives `dev` a free port and points the other commands at it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest

from tests.conftest import free_port
from tests.test_settings_cli import ServerProcess, clean_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def tour_commands() -> list[str]:
    """The `sh` blocks of the tour, one command each (continuation lines joined, comments dropped)."""
    text = README.read_text()
    found = re.search(r"<!-- tour:start -->(.*?)<!-- tour:end -->", text, re.DOTALL)
    assert found, "the README has no tour markers"
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", found.group(1), re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def on_port(command: str, port: int) -> str:
    command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    if command.endswith("realtime-service dev"):
        command += f" --port {port}"
    if "realtime-service listen " in command and "--url" not in command:
        command += f" --url http://127.0.0.1:{port}"
    return command


async def bash(command: str, env: dict[str, str], cwd: Path) -> ServerProcess:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return ServerProcess(proc, 0)


async def finished(process: ServerProcess, timeout: float = 30) -> int:
    """The exit code, once the process ended and all of its output was read."""
    code = await asyncio.wait_for(process.proc.wait(), timeout)
    await asyncio.wait_for(asyncio.gather(*process._pumps), 10)
    return code


@pytest.fixture
async def processes() -> AsyncIterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in started:
        await process.kill()


def test_the_tour_is_what_the_commands_section_and_dev_describe() -> None:
    commands = tour_commands()
    assert commands[0] == ".venv/bin/realtime-service dev"
    assert any(c == ".venv/bin/realtime-service listen 123" for c in commands)
    assert any(c.startswith("curl ") for c in commands)


async def test_the_readme_tour_runs_as_written(tmp_path: Path, processes: list[ServerProcess]) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()
    commands = [on_port(c, port) for c in tour_commands()]
    started = time.monotonic()
    env = clean_env()
    env.pop("USER_TOKEN", None)
    env.pop("SERVICE_TOKEN", None)

    # terminal 1: dev
    dev = await bash("exec " + commands[0], env, tmp_path)  # exec: Ctrl-C (SIGINT) reaches it, as in a terminal
    processes.append(dev)
    await dev.wait_for(lambda text: "export SERVICE_TOKEN=" in text and "listening on" in text, "dev ready", 90)
    assert "Traceback" not in dev.text
    pasted = re.findall(r"^export (USER_TOKEN|SERVICE_TOKEN)=(\S+)$", dev.text, re.MULTILINE)
    # the hint repeats how dev was started (the README's .venv/bin/..., or a bare name when that is on PATH)
    assert re.search(r"^then follow diagnosis 123 there: (\.venv/bin/)?realtime-service listen 123$", dev.text,
                     re.MULTILINE), dev.text
    assert [name for name, _ in pasted] == ["USER_TOKEN", "SERVICE_TOKEN"]
    # terminal 2 and 3: "paste those two export lines"
    exports = "\n".join(f"export {name}={shlex.quote(value)}" for name, value in pasted) + "\n"
    pasted_env = dict(env, **dict(pasted))

    listen_cmd = next(c for c in commands if c.endswith(f"listen 123 --url http://127.0.0.1:{port}"))
    listener = await bash(exports + "exec " + listen_cmd, env, tmp_path)
    processes.append(listener)
    await listener.wait_for(lambda text: '"type":"connect"' in text, "listen to show the connect frame", 30)

    curl_cmd = next(c for c in commands if c.startswith("curl "))
    publish = await bash(exports + curl_cmd, env, tmp_path)
    assert await finished(publish) == 0, publish.text
    answer = json.loads(publish.text)
    assert answer["diagnosis_id"] == 123 and answer["offset"] == 1 and answer["delivered"] == 1, answer
    await listener.wait_for(lambda text: '"type":"feedback_update"' in text, "the frame on screen", 30)
    assert time.monotonic() - started < 120, "from `dev` to a message on screen took over two minutes"
    frame = next(json.loads(line) for line in listener.text.splitlines() if '"type":"feedback_update"' in line)
    assert frame["offset"] == 1 and frame["data"]["rating"] == 5

    # the mistakes: one line each with the close code and reason
    for needle, command in (("closed 1008 forbidden", "SERVICE_TOKEN"), ("closed 1008 invalid_token", "}x")):
        mistake = next(c for c in commands if "listen 123 --token" in c and command in c)
        wrong = await bash(mistake, pasted_env, tmp_path)
        processes.append(wrong)
        assert await finished(wrong) == 1, wrong.text
        assert needle in wrong.text, wrong.text
        assert "Traceback" not in wrong.text

    # a token of your own, signed with dev's secret
    own = await bash(next(c for c in commands if "token --sub 457" in c), env, tmp_path)
    assert await finished(own) == 0, own.text
    secret = (tmp_path / ".realtime-dev" / "jwt_secret").read_text().strip()
    assert jwt.decode(own.text.strip(), secret, algorithms=["HS256"])["sub"] == "457"

    listener.proc.send_signal(2)
    await asyncio.wait_for(listener.proc.wait(), 10)
    dev.proc.send_signal(2)  # Ctrl-C stops it
    assert await asyncio.wait_for(dev.proc.wait(), 30) == 0, dev.text
    assert "Traceback" not in dev.text
