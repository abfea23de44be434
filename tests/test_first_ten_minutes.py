"""Issue 12: every operator mistake is one clear line at start (naming the key and its source), never a traceback.

The commands run for real, in subprocesses, against the session's PostgreSQL and loopback sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from realtime_service import __version__
from realtime_service.cli import _parser
from realtime_service.preflight import check_files, check_secrets
from realtime_service.settings import ConfigError, Settings, env_name, load
from tests.test_settings_cli import ServerProcess, clean_env, cli_path, run_cli

SECRET = "first-ten-minutes-" + "s" * 32
DB_PASSWORD = "pa55-w0rd-never-shown"


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The command failed with exactly one line on stderr, no traceback, containing every needle."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def closed_port() -> int:
    """A loopback port nobody listens on (bound and released: nothing is there to answer)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unreachable_dsn() -> str:
    return f"postgresql://realtime_ro:{DB_PASSWORD}@127.0.0.1:{closed_port()}/app"


# -- item 7: mistakes refused at start, naming the key and its source ---------------------------------------

@pytest.mark.parametrize("raw", ["inf", "1e400", "nan", "-inf"])
def test_infinite_heartbeat_from_the_environment_is_refused(tmp_path: Path, raw: str) -> None:
    result = run_cli("serve", env=clean_env(REALTIME_HEARTBEAT=raw, REALTIME_JWT_SECRET=SECRET,
                                            REALTIME_DATABASE_URL=unreachable_dsn()), cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result, "REALTIME_HEARTBEAT", "environment", "finite")


def test_boolean_heartbeat_in_toml_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text("heartbeat = true\n")
    result = run_cli("serve", "--config", str(config), env=clean_env(REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result, "heartbeat = true", str(config), "not a boolean")


def test_invalid_file_value_hidden_by_the_environment_is_still_refused(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text('port = "eighty"\nheartbeat = 15\n')
    with pytest.raises(ConfigError) as info:
        load({"REALTIME_PORT": "9000"}, config)
    assert f'port = "eighty" in {config}' in str(info.value)
    assert "heartbeat" not in str(info.value)
    result = run_cli("serve", "--config", str(config),
                     env=clean_env(REALTIME_PORT="9000", REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    one_line_error(result, "port", str(config))


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--port 70000"):
        load({}, overrides={"port": 70000})


def test_pool_minimum_above_maximum_is_refused_naming_both_sources(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text("db_pool_max = 3\n")
    result = run_cli("serve", "--config", str(config),
                     env=clean_env(REALTIME_DB_POOL_MIN="5", REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result, "db_pool_min 5", "REALTIME_DB_POOL_MIN in the environment", "db_pool_max 3",
                   str(config))


def test_short_hs256_secret_is_refused_in_production_only(tmp_path: Path) -> None:
    result = run_cli("serve", env=clean_env(REALTIME_JWT_SECRET="too-short-secret",
                                            REALTIME_DATABASE_URL=unreachable_dsn()), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result, "jwt_secret", "REALTIME_JWT_SECRET in the environment", "16 bytes", "32")
    assert "too-short-secret" not in line
    development = load({"REALTIME_JWT_SECRET": "short", "REALTIME_ENV": "development"})
    check_secrets(development)  # a development secret may be anything
    with pytest.raises(ConfigError, match="64"):
        check_secrets(load({"REALTIME_JWT_SECRET": "x" * 40, "REALTIME_JWT_ALGORITHMS": "HS512"}))
    check_secrets(load({"REALTIME_JWT_SECRET": "x" * 32}))


@pytest.mark.parametrize(("args", "needles"), [
    (("--sub", "456", "--ttl", "-5"), ("--ttl -5", "at least 1 second")),
    (("--sub", "456", "--ttl", "0"), ("--ttl 0",)),
    (("--sub", "abc"), ("--sub 'abc'", "positive integer", "--scope realtime:publish")),
    (("--sub", "-4"), ("--sub '-4'",)),
    (("--sub", "0"), ("--sub '0'",)),
])
def test_token_that_could_never_work_is_refused(tmp_path: Path, args: tuple[str, ...],
                                                needles: tuple[str, ...]) -> None:
    result = run_cli("token", *args, env=clean_env(REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    one_line_error(result, *needles)


def test_service_token_may_have_any_subject(tmp_path: Path) -> None:
    result = run_cli("token", "--sub", "main-api", "--scope", "realtime:publish",
                     env=clean_env(REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "main-api"


def test_unknown_realtime_variable_warns_with_the_closest_name() -> None:
    loaded = load({"REALTIME_HEARTBEET": "5", "REALTIME_DATABSE_URL": "postgresql://x@y/z", "REALTIME_ZZZZ": "1",
                   "REALTIME_TEST_DATABASE_URL": "postgresql://x@y/z", "REALTIME_TEST_ANYTHING": "1",
                   "REALTIME_FUZZ_EXAMPLES": "50"})
    assert loaded.warnings == (
        "REALTIME_DATABSE_URL is not a setting and is ignored; did you mean REALTIME_DATABASE_URL?",
        "REALTIME_HEARTBEET is not a setting and is ignored; did you mean REALTIME_HEARTBEAT?",
        "REALTIME_ZZZZ is not a setting and is ignored; every setting is listed in config/default.toml",
    )
    assert loaded.settings.heartbeat == 30


def test_every_setting_is_a_known_variable() -> None:
    """Settings other helpers add are known by construction: the list is the model's fields."""
    environ = {env_name(name): "" for name in Settings.model_fields}
    assert load({}).warnings == ()
    from realtime_service.settings import unknown_env_warnings

    assert unknown_env_warnings(environ) == ()


async def test_unknown_variable_warning_reaches_the_log(pg_dsn: str, tmp_path: Path,
                                                       servers: list[ServerProcess]) -> None:
    server = await ServerProcess.start(clean_env(REALTIME_DATABASE_URL=pg_dsn, REALTIME_JWT_SECRET=SECRET,
                                                 REALTIME_HEARTBEET="5"), tmp_path)
    servers.append(server)
    await server.ready()
    assert "did you mean REALTIME_HEARTBEAT?" in server.text
    async with aiohttp.ClientSession() as http, http.get(f"{server.base_url}/healthz") as resp:
        assert resp.status == 200  # serving (and its signal handlers in place)
    code, _ = await server.terminate()
    assert code == 0


@pytest.mark.parametrize(("query", "needle"), [
    ("SELECT user_id FROM diagnoses WHERE id = %(id)s", "unknown placeholder %(id)s"),
    ("SELECT user_id FROM diagnoses WHERE id = %s", "placeholder '%s' is not supported"),
    ("SELECT user_id FROM diagnoses", "must use %(diagnosis_id)s"),
])
def test_ownership_query_with_a_wrong_placeholder_is_refused(tmp_path: Path, query: str, needle: str) -> None:
    result = run_cli("serve", env=clean_env(REALTIME_OWNERSHIP_QUERY=query, REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result, "REALTIME_OWNERSHIP_QUERY", "in the environment", needle)


def test_literal_percent_in_the_ownership_query_is_fine() -> None:
    query = "SELECT user_id FROM diagnoses WHERE id = %(diagnosis_id)s AND title NOT LIKE '%%draft'"
    assert load({"REALTIME_OWNERSHIP_QUERY": query}).settings.ownership_query == query


@pytest.mark.parametrize(("query", "needles"), [
    ("SELECT user_id::text FROM diagnoses WHERE id = %(diagnosis_id)s", ("type text", "integer")),
    ("SELECT title FROM diagnoses WHERE id = %(diagnosis_id)s", ("type text",)),
    ("SELECT owner FROM no_such_table WHERE id = %(diagnosis_id)s", ("fails on the replica", "no_such_table")),
])
def test_ownership_query_that_cannot_answer_is_refused_against_the_replica(
        pg_dsn: str, tmp_path: Path, query: str, needles: tuple[str, ...]) -> None:
    config = tmp_path / "app.toml"
    config.write_text(f"ownership_query = {json.dumps(query)}\n")
    result = run_cli("serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0",
                     env=clean_env(REALTIME_DATABASE_URL=pg_dsn, REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("realtime-service serve:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr
    for needle in ("ownership_query", str(config), *needles):
        assert needle in errors[0], errors[0]


# -- item 5: files named by settings are checked at start ------------------------------------------------------

def test_missing_key_file_is_named_with_its_setting_and_source(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "production.example.toml"
    result = run_cli("serve", "--config", str(example), env=clean_env(REALTIME_DATABASE_URL=unreachable_dsn()),
                     cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result, "jwt_public_key_file", str(example), "/etc/realtime/jwt-public.pem", "does not exist")
    folder = load({"REALTIME_JWT_PUBLIC_KEY_FILE": str(tmp_path), "REALTIME_JWT_ALGORITHMS": "RS256"})
    with pytest.raises(ConfigError, match=r"REALTIME_JWT_PUBLIC_KEY_FILE in the environment.*folder"):
        check_files(folder)


def test_present_key_file_passes_the_check(tmp_path: Path) -> None:
    key = tmp_path / "jwt-public.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\n")
    check_files(load({"REALTIME_JWT_PUBLIC_KEY_FILE": str(key), "REALTIME_JWT_ALGORITHMS": "RS256"}))


# -- item 3: bind first, then print; one line for a busy port, a bad host, an unreachable database ------------

def test_serve_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--host", "127.0.0.1", "--port", str(port),
                         env=clean_env(REALTIME_JWT_SECRET=SECRET, REALTIME_DATABASE_URL=unreachable_dsn()),
                         cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    one_line_error(result, f"port {port}", "already in use", "--port", "REALTIME_PORT=")


def test_busy_port_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", env=clean_env(REALTIME_JWT_SECRET=SECRET, REALTIME_HOST="127.0.0.1",
                                                REALTIME_PORT=str(port), REALTIME_DATABASE_URL=unreachable_dsn()),
                         cwd=tmp_path)
    one_line_error(result, f"port {port}", "REALTIME_PORT in the environment")


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid"])
def test_serve_on_an_impossible_host_says_so_in_one_line(tmp_path: Path, host: str) -> None:
    result = run_cli("serve", "--host", host, env=clean_env(REALTIME_JWT_SECRET=SECRET), cwd=tmp_path)
    assert result.returncode == 1
    one_line_error(result, host, "--host", "cannot listen")


def test_dev_on_a_busy_port_prints_nothing_else_and_starts_no_database(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("dev", "--port", str(port), env=clean_env(), cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""  # no banner, no tokens
    errors = [line for line in result.stderr.splitlines() if line.startswith("realtime-service dev:")]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "--port" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".realtime-dev" / "pgdata").exists()


def test_migrate_against_an_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    dsn = unreachable_dsn()
    result = run_cli("migrate", env=clean_env(REALTIME_DATABASE_URL=dsn), cwd=tmp_path)
    assert result.returncode == 1
    port = dsn.rsplit(":", 1)[1].split("/")[0]
    line = one_line_error(result, f"127.0.0.1:{port}", "REALTIME_DATABASE_URL in the environment", "refused")
    assert DB_PASSWORD not in line


# -- item 8: the replica at start, later replica errors, the port bound ---------------------------------------

async def start_serve(env: dict[str, str], cwd: Path, *args: str) -> ServerProcess:
    proc = await asyncio.create_subprocess_exec(
        cli_path(), "serve", *args, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return ServerProcess(proc, 0)


async def test_unreachable_replica_is_logged_at_start_and_on_each_later_error(
        tmp_path: Path, servers: list[ServerProcess]) -> None:
    dsn = unreachable_dsn()
    replica_port = dsn.rsplit(":", 1)[1].split("/")[0]
    server = await start_serve(clean_env(REALTIME_DATABASE_URL=dsn, REALTIME_JWT_SECRET=SECRET,
                                         REALTIME_DB_CONNECT_TIMEOUT="1"), tmp_path, "--host", "127.0.0.1",
                               "--port", "0")
    servers.append(server)
    await server.ready()
    start_lines = [json.loads(line) for line in server.text.splitlines() if "does not answer" in line]
    assert len(start_lines) == 1, server.text
    message = start_lines[0]["message"]
    assert f"127.0.0.1:{replica_port}" in message
    assert "Connection refused" in message
    assert "realtime_ro:***@" in message
    # --port 0: the port bound, not 0
    listening = next(json.loads(line) for line in server.text.splitlines() if "listening on" in line)
    port = listening["port"]
    assert port > 0
    assert f"listening on 127.0.0.1:{port} " in listening["message"]
    token = jwt.encode({"sub": "7", "exp": 2_000_000_000}, SECRET, algorithm="HS256")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{port}/ws/1", headers={"Authorization": f"Bearer {token}"})
        await ws.receive(timeout=15)
        assert ws.close_code == 1013
    await server.wait_for(lambda text: "replica error" in text, "the replica error line")
    later = next(json.loads(line) for line in server.text.splitlines() if "replica error" in line)["message"]
    assert "OperationalError" in later and "refused" in later.lower(), later  # more than the class name
    assert DB_PASSWORD not in server.text
    code, _ = await server.terminate()
    assert code == 0


# -- item 4 and item 2: dev prints export lines, and a second dev in the folder points at the first --------------

async def test_dev_prints_export_lines_that_work_and_a_second_dev_points_at_the_first(
        tmp_path: Path, servers: list[ServerProcess]) -> None:
    proc = await asyncio.create_subprocess_exec(
        cli_path(), "dev", "--port", "0", env=clean_env(), cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    first = ServerProcess(proc, 0)
    servers.append(first)
    await first.wait_for(lambda text: "export SERVICE_TOKEN=" in text and "listening on" in text, "dev", 90)
    exports = dict(re.findall(r"^export ([A-Z_]+)=(\S+)$", first.text, re.MULTILINE))
    assert set(exports) == {"USER_TOKEN", "SERVICE_TOKEN"}, first.text  # no REALTIME_*: they are settings
    found = re.search(r"running on (http://127\.0\.0\.1:[1-9][0-9]*) ", first.text)
    assert found, first.text
    base = found.group(1)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(base.replace("http", "ws") + "/ws/123")
        await ws.send_json({"type": "auth", "token": exports["USER_TOKEN"]})
        connect = await ws.receive_json(timeout=10)
        assert connect["type"] == "connect" and connect["data"]["user_id"] == 456
        async with http.post(f"{base}/api/v1/publish", json={"diagnosis_id": 123, "type": "hello", "data": {}},
                             headers={"Authorization": f"Bearer {exports['SERVICE_TOKEN']}"}) as resp:
            assert resp.status == 200, await resp.text()
        while (await ws.receive_json(timeout=10))["type"] != "hello":
            pass
        await ws.close()

    second = await asyncio.to_thread(run_cli, "dev", env=clean_env(), cwd=tmp_path, timeout=30)
    assert second.returncode == 1
    assert second.stdout == ""
    line = one_line_error(second, "already running", f"{base}/console", "--data-dir")
    assert "stop" not in line.lower() and "pg_ctl" not in line
    async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as resp:
        assert resp.status == 200  # the first one was left alone
    code, _ = await first.terminate()
    assert code == 0


# -- item 6: --help a user reads, --version ---------------------------------------------------------------------

def _actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{name} {a.dest}", a) for a in sub._actions]
        else:
            found.append((action.dest, action))
    return found


def test_every_command_and_flag_has_help() -> None:
    parser = _parser()
    for where, action in _actions(parser):
        assert action.help and len(action.help) > 10, f"{where} has no help"
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.description and "PROTOCOL" not in sub.description, name
        assert "REALTIME_" in (sub.epilog or ""), name
    assert "PROTOCOL" not in (parser.description or "")


def test_help_and_version_from_the_console_script(tmp_path: Path) -> None:
    top = run_cli("--help", env=clean_env(), cwd=tmp_path)
    assert top.returncode == 0
    for word in ("serve", "dev", "migrate", "token", "REALTIME_DATABASE_URL", "docs/protocol.md", "--version"):
        assert word in top.stdout, word
    serve = run_cli("serve", "--help", env=clean_env(), cwd=tmp_path)
    for word in ("--host", "--port", "--config", "REALTIME_PORT", "REALTIME_HOST", "TOML"):
        assert word in serve.stdout, word
    version = run_cli("--version", env=clean_env(), cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.strip() == f"realtime-service {__version__}"
    same = subprocess.run([sys.executable, "-m", "realtime_service", "--version"], capture_output=True, text=True,
                          env=clean_env(), cwd=tmp_path, timeout=60, check=False)
    assert same.stdout == version.stdout


@pytest.fixture
async def servers() -> AsyncIterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.kill()


async def test_dev_after_a_killed_dev_reuses_the_database_left_running(tmp_path: Path,
                                                                      servers: list[ServerProcess]) -> None:
    """A dev killed with SIGKILL leaves its PostgreSQL running; the next dev in the folder takes it over."""
    env = clean_env()

    async def start_dev() -> ServerProcess:
        proc = await asyncio.create_subprocess_exec(
            cli_path(), "dev", "--port", "0", env=env, cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        server = ServerProcess(proc, 0)
        servers.append(server)
        await server.wait_for(lambda text: "export SERVICE_TOKEN=" in text and "listening on" in text, "dev", 90)
        return server

    first = await start_dev()
    await first.kill()  # SIGKILL: no chance to stop its PostgreSQL
    second = await start_dev()
    assert "reusing the embedded PostgreSQL left running" in second.text
    found = re.search(r"running on (http://127\.0\.0\.1:[0-9]+) ", second.text)
    assert found, second.text
    async with aiohttp.ClientSession() as http, http.get(f"{found.group(1)}/healthz") as resp:
        assert resp.status == 200
    code, _ = await second.terminate()
    assert code == 0
    folder = re.search(r'embedded PostgreSQL data folder: ([^"]+)"', first.text)
    assert folder, first.text
    assert await asyncio.to_thread(_gone_soon, folder.group(1)), "the adopted PostgreSQL was not stopped"


def _gone_soon(pattern: str) -> bool:
    """No process runs on the data folder (pg_ctl stop waited; its last children get a moment to leave)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True, check=False).returncode != 0:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("dsn", ["replica.internal:5432", "postgresql://ro:s3cr3t-pw@replica:port/app"])
def test_a_database_url_that_is_no_dsn_is_refused_without_showing_it(tmp_path: Path, dsn: str) -> None:
    result = run_cli("migrate", env=clean_env(REALTIME_DATABASE_URL=dsn), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result, "REALTIME_DATABASE_URL", "in the environment")
    assert "s3cr3t-pw" not in line and "replica" not in line


def test_token_with_a_mistyped_secret_variable_says_which_name_was_meant(tmp_path: Path) -> None:
    result = run_cli("token", "--sub", "456", env=clean_env(REALTIME_JWT_SECRT=SECRET), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "REALTIME_JWT_SECRT is not a setting and is ignored; did you mean REALTIME_JWT_SECRET?" in result.stderr
    assert "REALTIME_JWT_SECRET is required" in result.stderr
    assert SECRET not in result.stderr


@pytest.mark.parametrize(("args", "needles"), [
    (("serve", "--port", "abc"), ("realtime-service serve: argument --port: invalid int value: 'abc'",
                                  "realtime-service serve --help")),
    (("token",), ("--sub", "realtime-service token --help")),
    (("frobnicate",), ("invalid choice: 'frobnicate'", "realtime-service --help")),
])
def test_a_usage_mistake_is_one_line_pointing_at_the_help(tmp_path: Path, args: tuple[str, ...],
                                                          needles: tuple[str, ...]) -> None:
    result = run_cli(*args, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result, *needles)
