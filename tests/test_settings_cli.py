"""PROTOCOL 8: settings (defaults <- TOML <- environment) and the `realtime-service` command line, run for real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import psycopg2
import pytest

from realtime_service.settings import DEFAULT_OWNERSHIP_QUERY, ConfigError, Settings, load_settings
from tests.conftest import PgServer, free_port
from tests.support import Client, Seeder, Tokens

# -- settings ---------------------------------------------------------------------------------------------

PROTOCOL_DEFAULTS: dict[str, Any] = {
    "port": 8080,
    "env": "production",
    "database_url": None,
    "redis_url": None,
    "jwt_secret": None,
    "jwt_algorithms": ("HS256",),
    "jwt_public_key_file": None,
    "jwt_audience": None,
    "jwt_issuer": None,
    "heartbeat": 30,
    "history_size": 100,
    "history_ttl": 24 * 3600,
    "ownership_query": "SELECT user_id FROM diagnoses WHERE id = %(diagnosis_id)s",
    "ownership_cache_ttl": 5,
    "console_enabled": False,
    "allowed_origins": (),
    "auth_timeout": 5,
    "jwt_leeway": 10,
    "max_frame_bytes": 65536,
    "max_body_bytes": 1048576,
    "outbox_max_bytes": 1048576,
    "outbox_max_messages": 1000,
    "rate_limit": 20,
    "rate_burst": 40,
    "drain_period": 10,
    "shutdown_grace": 30,
    "db_pool_min": 1,
    "db_pool_max": 10,
    "db_connect_timeout": 5,
    "db_statement_timeout": 2,
    "ws_compression": False,
}


@pytest.mark.parametrize(("name", "value"), list(PROTOCOL_DEFAULTS.items()))
def test_defaults_match_protocol(name: str, value: Any) -> None:
    assert getattr(load_settings({}), name) == value


def test_default_ownership_query_is_the_documented_one() -> None:
    assert PROTOCOL_DEFAULTS["ownership_query"] == DEFAULT_OWNERSHIP_QUERY


def write_toml(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_overrides_defaults_and_env_overrides_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'port = 9001\nheartbeat = 12.5\njwt_algorithms = ["RS256"]\n'
                                  'history_size = 7\nconsole_enabled = true\nallowed_origins = ["https://a.example"]\n')
    from_file = load_settings({}, config)
    assert from_file.port == 9001
    assert from_file.heartbeat == 12.5
    assert from_file.jwt_algorithms == ("RS256",)
    assert from_file.history_size == 7
    assert from_file.console_enabled is True
    assert from_file.allowed_origins == ("https://a.example",)
    env = {"REALTIME_PORT": "9002", "REALTIME_JWT_ALGORITHMS": "HS256,HS384", "REALTIME_CONSOLE_ENABLED": "false",
           "REALTIME_ALLOWED_ORIGINS": "https://b.example, https://c.example"}
    both = load_settings(env, config)
    assert both.port == 9002
    assert both.jwt_algorithms == ("HS256", "HS384")
    assert both.console_enabled is False
    assert both.allowed_origins == ("https://b.example", "https://c.example")
    assert both.heartbeat == 12.5  # not overridden: still the file's
    assert both.history_size == 7


def test_unrelated_environment_is_ignored() -> None:
    settings = load_settings({"PORT": "1", "HOME": "/root", "REALTIME_TEST_DATABASE_URL": "postgresql://x/y"})
    assert settings.port == 8080
    assert settings.database_url is None


@pytest.mark.parametrize(("var", "raw", "name", "expected"), [
    ("REALTIME_HEARTBEAT", "0.5", "heartbeat", 0.5),
    ("REALTIME_AUTH_TIMEOUT", "2.25", "auth_timeout", 2.25),
    ("REALTIME_DRAIN_PERIOD", "1.5", "drain_period", 1.5),
    ("REALTIME_JWT_LEEWAY", "0", "jwt_leeway", 0),
    ("REALTIME_HISTORY_TTL", "3600.5", "history_ttl", 3600.5),
    ("REALTIME_OWNERSHIP_CACHE_TTL", "0.1", "ownership_cache_ttl", 0.1),
    ("REALTIME_CONSOLE_ENABLED", "true", "console_enabled", True),
    ("REALTIME_CONSOLE_ENABLED", "false", "console_enabled", False),
    ("REALTIME_WS_COMPRESSION", "true", "ws_compression", True),
    ("REALTIME_JWT_ALGORITHMS", "RS256", "jwt_algorithms", ("RS256",)),
    ("REALTIME_JWT_ALGORITHMS", " HS256 , ES256 ", "jwt_algorithms", ("HS256", "ES256")),
    ("REALTIME_ALLOWED_ORIGINS", "https://a.example,https://b.example", "allowed_origins",
     ("https://a.example", "https://b.example")),
    ("REALTIME_MAX_FRAME_BYTES", "4096", "max_frame_bytes", 4096),
    ("REALTIME_RATE_LIMIT", "2.5", "rate_limit", 2.5),
    ("REALTIME_ENV", "development", "env", "development"),
    ("REALTIME_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("REALTIME_JWT_AUDIENCE", "realtime", "jwt_audience", "realtime"),
    ("REALTIME_JWT_ISSUER", "https://api.example", "jwt_issuer", "https://api.example"),
    ("REALTIME_JWT_PUBLIC_KEY_FILE", "/keys/pub.pem", "jwt_public_key_file", Path("/keys/pub.pem")),
    ("REALTIME_DB_POOL_MAX", "3", "db_pool_max", 3),
    ("REALTIME_DB_STATEMENT_TIMEOUT", "0.75", "db_statement_timeout", 0.75),
])
def test_environment_values_are_parsed(var: str, raw: str, name: str, expected: Any) -> None:
    assert getattr(load_settings({var: raw}), name) == expected


@pytest.mark.parametrize(("var", "raw"), [
    ("REALTIME_PORT", "eighty"),
    ("REALTIME_PORT", "70000"),
    ("REALTIME_HEARTBEAT", "fast"),
    ("REALTIME_HEARTBEAT", "0"),
    ("REALTIME_DRAIN_PERIOD", "-1"),
    ("REALTIME_CONSOLE_ENABLED", "maybe"),
    ("REALTIME_WS_COMPRESSION", "sometimes"),
    ("REALTIME_JWT_ALGORITHMS", "HS256,none"),
    ("REALTIME_JWT_ALGORITHMS", ","),
    ("REALTIME_LOG_LEVEL", "LOUD"),
    ("REALTIME_ENV", "staging"),
    ("REALTIME_MAX_FRAME_BYTES", "1.5"),
    ("REALTIME_HISTORY_SIZE", "0"),
    ("REALTIME_RATE_BURST", "lots"),
])
def test_bad_values_give_config_error_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({var: raw})
    assert var in str(info.value)


def test_bad_file_value_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="heartbeat"):
        load_settings({}, write_toml(tmp_path, 'heartbeat = "soon"\n'))


@pytest.mark.parametrize(("text", "unknown"), [("prot = 8080\n", "prot"), ("REALTIME_PORT = 8080\n", "REALTIME_PORT"),
                                               ("[server]\nport = 1\n", "server"),
                                               ("port = 1\nsecret_sauce = true\n", "secret_sauce")])
def test_unknown_toml_key_is_refused(tmp_path: Path, text: str, unknown: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, write_toml(tmp_path, text))
    assert unknown in str(info.value)


def test_broken_or_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings({}, write_toml(tmp_path, "port = = 1\n"))
    with pytest.raises(ConfigError):
        load_settings({}, tmp_path / "absent.toml")


def test_secrets_are_masked(tmp_path: Path) -> None:
    secret, db_password, redis_password = "jwt-s3cret-value-xyz", "db-pa55word-xyz", "redis-pa55word-xyz"
    settings = load_settings({"REALTIME_JWT_SECRET": secret,
                              "REALTIME_DATABASE_URL": f"postgresql://app:{db_password}@db:5432/main",
                              "REALTIME_REDIS_URL": f"redis://:{redis_password}@redis:6379/0"})
    rendered = [repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump()),
                f"{settings}", f"{settings!r}"]
    for text in rendered:
        for value in (secret, db_password, redis_password):
            assert value not in text, text
    assert settings.secret("jwt_secret") == secret
    assert db_password in (settings.secret("database_url") or "")
    with pytest.raises(ConfigError) as info:  # a bad value elsewhere does not drag the secrets into the error
        load_settings({"REALTIME_JWT_SECRET": secret, "REALTIME_PORT": "x"})
    assert secret not in str(info.value)


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_settings_type_is_exported() -> None:
    assert isinstance(load_settings({}), Settings)


# -- the command line -------------------------------------------------------------------------------------

def cli_path() -> str:
    local = Path(sys.executable).parent / "realtime-service"
    found = str(local) if local.exists() else shutil.which("realtime-service")
    assert found, "the realtime-service console script is not installed"
    return found


def clean_env(**values: str) -> dict[str, str]:
    """The test's environment without any REALTIME_* variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    env.update(values)
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cli_path(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_token_prints_a_valid_hs256_token(tmp_path: Path) -> None:
    secret = "cli-secret-" + "z" * 32
    result = run_cli("token", "--sub", "456", "--scope", "realtime:publish", "--ttl", "3600",
                     env=clean_env(REALTIME_JWT_SECRET=secret), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "456"
    assert claims["scope"] == "realtime:publish"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60
    user = run_cli("token", "--sub", "7", env=clean_env(REALTIME_JWT_SECRET=secret), cwd=tmp_path)
    assert user.returncode == 0, user.stderr
    user_claims = jwt.decode(user.stdout.strip(), secret, algorithms=["HS256"])
    assert user_claims["sub"] == "7"
    assert "scope" not in user_claims


def test_token_without_secret_fails_clearly(tmp_path: Path) -> None:
    result = run_cli("token", "--sub", "456", env=clean_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "REALTIME_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == ""


def test_python_dash_m_token_works(tmp_path: Path) -> None:
    secret = "cli-secret-" + "m" * 32
    result = subprocess.run([sys.executable, "-m", "realtime_service", "token", "--sub", "9", "--ttl", "60"],
                            env=clean_env(REALTIME_JWT_SECRET=secret), cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "9"
    assert claims["exp"] - claims["iat"] == 60


def _tables(dsn: str) -> set[str]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _schema(dsn: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                        "WHERE table_schema = 'public' ORDER BY 1, 2")
            columns = cur.fetchall()
            cur.execute("SELECT name, applied_at FROM schema_migrations ORDER BY 1")
            return columns + cur.fetchall()
    finally:
        conn.close()


def test_migrate_needs_only_the_database_url_and_is_idempotent(pg_server: PgServer, tmp_path: Path) -> None:
    dsn = pg_server.create_database("cli_migrate", migrated=False)
    assert not {"users", "diagnoses"} & _tables(dsn)
    env = clean_env(REALTIME_DATABASE_URL=dsn)  # no JWT secret: migrate does not need one
    first = run_cli("migrate", env=env, cwd=tmp_path)  # from a folder without migrations/
    assert first.returncode == 0, first.stderr
    assert {"users", "diagnoses"} <= _tables(dsn)
    before = _schema(dsn)
    second = run_cli("migrate", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert _schema(dsn) == before
    seeder = Seeder(dsn)
    uid = seeder.user()
    seeder.diagnosis(uid)  # a plain INSERT INTO diagnoses (id, user_id) works


def test_migrate_without_database_url_fails_clearly(tmp_path: Path) -> None:
    result = run_cli("migrate", env=clean_env(REALTIME_JWT_SECRET="s" * 32), cwd=tmp_path)
    assert result.returncode == 2
    assert "REALTIME_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


# -- serve ------------------------------------------------------------------------------------------------

class ServerProcess:
    """`realtime-service serve` in a subprocess, with its stdout and stderr captured line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.output: list[str] = []
        self._changed = asyncio.Event()
        self._pumps = [asyncio.create_task(self._pump(s)) for s in (proc.stdout, proc.stderr) if s is not None]

    @classmethod
    async def start(cls, env: dict[str, str], cwd: Path, *extra: str) -> ServerProcess:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            cli_path(), "serve", "--host", "127.0.0.1", "--port", str(port), *extra, env=env, cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc, port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def text(self) -> str:
        return "".join(self.output)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.output.append(line.decode(errors="replace"))
            self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.text):
            if all(p.done() for p in self._pumps):
                raise AssertionError(f"server exited ({self.proc.returncode}) before {what}:\n{self.text}")
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}:\n{self.text}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def ready(self) -> None:
        await self.wait_for(lambda text: "listening on" in text, "the server to listen")

    async def terminate(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM, then wait for the exit; returns (exit code, seconds it took)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._pumps), 10)
        return code, time.monotonic() - started

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


@pytest.fixture
async def servers() -> AsyncIterator[list[ServerProcess]]:
    """Servers a test starts; any still running afterwards are killed."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.kill()


def serve_env(dsn: str, secret: str, **extra: str) -> dict[str, str]:
    return clean_env(REALTIME_DATABASE_URL=dsn, REALTIME_JWT_SECRET=secret, **extra)


async def test_serve_answers_healthz_and_exits_0_on_sigterm(pg_dsn: str, tmp_path: Path,
                                                            servers: list[ServerProcess]) -> None:
    server = await ServerProcess.start(serve_env(pg_dsn, "s" * 32), tmp_path)
    servers.append(server)
    await server.ready()
    async with aiohttp.ClientSession() as http, http.get(f"{server.base_url}/healthz") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        await resp.json()
    code, elapsed = await server.terminate()
    assert code == 0, server.text
    assert elapsed < 10


@pytest.mark.parametrize("name", ["realtime.toml", "config.toml"])
async def test_serve_ignores_config_files_in_the_working_directory(pg_dsn: str, tmp_path: Path, name: str,
                                                                   servers: list[ServerProcess]) -> None:
    (tmp_path / name).write_text("this is = = not toml\nport = \"nope\"\n")
    (tmp_path / ".realtime.toml").write_text("unknown_key = 1\n")
    server = await ServerProcess.start(serve_env(pg_dsn, "s" * 32), tmp_path)
    servers.append(server)
    await server.ready()
    async with aiohttp.ClientSession() as http, http.get(f"{server.base_url}/healthz") as resp:
        assert resp.status == 200
    code, _ = await server.terminate()
    assert code == 0, server.text


async def test_serve_with_explicit_config_file_uses_it(pg_dsn: str, tmp_path: Path,
                                                       servers: list[ServerProcess]) -> None:
    config = write_toml(tmp_path, 'console_enabled = true\nenv = "development"\n', "chosen.toml")
    server = await ServerProcess.start(serve_env(pg_dsn, "s" * 32), tmp_path, "--config", str(config))
    servers.append(server)
    await server.ready()
    async with aiohttp.ClientSession() as http, http.get(f"{server.base_url}/console") as resp:
        assert resp.status == 200  # only on because the named file said so
    code, _ = await server.terminate()
    assert code == 0, server.text


async def test_sigterm_drains_every_client_with_service_restart(pg_dsn: str, tmp_path: Path,
                                                                servers: list[ServerProcess]) -> None:
    secret = "drain-secret-" + "d" * 32
    tokens, seeder = Tokens(secret), Seeder(pg_dsn)
    grace = 6.0
    server = await ServerProcess.start(
        serve_env(pg_dsn, secret, REALTIME_DRAIN_PERIOD="1", REALTIME_SHUTDOWN_GRACE=str(grace)), tmp_path)
    servers.append(server)
    await server.ready()
    uid, did = seeder.owned()
    async with aiohttp.ClientSession() as http:
        clients: list[Client] = []
        for i in range(20):
            ws = await http.ws_connect(f"ws://127.0.0.1:{server.port}/ws/{did}?device=d{i}",
                                       headers={"Authorization": f"Bearer {tokens.user(uid)}"})
            clients.append(Client(ws).start())
        for client in clients:
            await client.wait(lambda c: c.of_type("connect"), "the connect frame")
        async with http.post(f"{server.base_url}/api/v1/publish",
                             json={"diagnosis_id": did, "type": "before_restart", "data": {"n": 1}},
                             headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        assert answer["delivered"] == 20

        loop = asyncio.get_running_loop()

        async def closed_at(client: Client) -> float:
            await client.wait_closed(timeout=grace + 5)
            return loop.time()

        watchers = [asyncio.create_task(closed_at(c)) for c in clients]
        terminated = asyncio.create_task(server.terminate(timeout=grace + 5))
        first_close = await next(asyncio.as_completed(watchers))
        # while draining, new connections are refused
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"ws://127.0.0.1:{server.port}/ws/{did}",
                                  headers={"Authorization": f"Bearer {tokens.user(uid)}"})
        assert refused.value.status == 503
        close_times = await asyncio.gather(*watchers)
        code, elapsed = await terminated

    assert code == 0, server.text
    assert elapsed < grace, f"exit took {elapsed:.2f}s, grace is {grace}s"
    for client in clients:
        assert client.close_code == 1012, (client.close_code, client.close_reason)
        assert client.close_reason == "service_restart"
        assert [f["data"] for f in client.of_type("before_restart")] == [{"n": 1}]  # the answered publish arrived
    assert min(close_times) == first_close
    assert max(close_times) - min(close_times) >= 0.2, "closes were not spread over the drain period"
    assert max(close_times) - min(close_times) <= 1.5 + 0.5
