"""Frozen settings: defaults <- TOML file <- REALTIME_* environment (PROTOCOL 8); secrets stay masked.

The environment is passed in, never read here, so two apps in one test can hold different settings.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "REALTIME_"
DEFAULT_OWNERSHIP_QUERY = "SELECT user_id FROM diagnoses WHERE id = %(diagnosis_id)s"
DEFAULT_OWNERSHIP_BATCH_QUERY = "SELECT id, user_id FROM diagnoses WHERE id = ANY(%(diagnosis_ids)s)"
LIST_FIELDS = frozenset({"jwt_algorithms", "allowed_origins", "allowed_hosts", "trusted_proxies"})
OPTIONAL_FIELDS = frozenset({"database_url", "redis_url", "jwt_secret", "jwt_public_key_file", "jwt_audience",
                             "jwt_previous_secret", "jwt_jwks_file",
                             "public_origin", "broker_encryption_keys",
                             "jwt_issuer"})


# REALTIME_* variables that are not settings but are read by someone on purpose (the test-suite's knobs start
# with REALTIME_TEST_ or REALTIME_FUZZ_); an unknown one is warned about, with the closest setting's name.
KNOWN_ENV_PREFIXES = ("REALTIME_TEST_", "REALTIME_FUZZ_")
KNOWN_ENV_NAMES: frozenset[str] = frozenset()

# psycopg2 placeholders: %(name)s, %s, or a literal %%.
_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]*)\))?(?P<kind>.)", re.DOTALL)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the setting and where its value came from."""


class Settings(BaseModel):
    """Every setting of PROTOCOL 8. Durations are seconds, sizes bytes."""

    # allow_inf_nan=False: `heartbeat = inf` (or 1e400) would mean a heartbeat that never fires.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)  # `serve --workers`: processes sharing the port (PROTOCOL 5.4)
    env: Literal["production", "development"] = "production"
    database_url: SecretStr | None = None
    redis_url: SecretStr | None = None
    redis_prefix: str = Field("rt", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    redis_timeout: float = Field(2, gt=0, le=60)
    broker_encryption_keys: SecretStr | None = None  # kid:base64-of-32-bytes[,...]; the first seals, all open
    jwt_secret: SecretStr | None = None
    jwt_previous_secret: SecretStr | None = None  # verify only: the secret being rotated out (PROTOCOL 2)
    jwt_jwks_file: Path | None = None  # JSON Web Key Set; keys chosen by `kid`, re-read on SIGHUP and on change
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key_file: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = Field(10, ge=0)
    heartbeat: float = Field(30, gt=0)
    history_size: int = Field(100, ge=1)
    history_ttl: float = Field(86400, gt=0)
    history_max_bytes: int = Field(1048576, ge=1024)
    ownership_query: str = DEFAULT_OWNERSHIP_QUERY
    ownership_cache_ttl: float = Field(5, ge=0)
    ownership_batch_query: str = DEFAULT_OWNERSHIP_BATCH_QUERY
    ownership_batch_window: float = Field(0.005, ge=0, le=0.1)
    console_enabled: bool = False
    allowed_origins: tuple[str, ...] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    auth_timeout: float = Field(5, gt=0)
    max_frame_bytes: int = Field(65536, ge=128)
    max_body_bytes: int = Field(1048576, ge=1024)
    outbox_max_bytes: int = Field(1048576, ge=1024)
    outbox_max_messages: int = Field(1000, ge=1)
    rate_limit: float = Field(20, gt=0)
    rate_burst: int = Field(40, ge=1)
    drain_period: float = Field(10, ge=0)
    shutdown_grace: float = Field(30, ge=0)
    db_pool_min: int = Field(1, ge=0)
    db_pool_max: int = Field(10, ge=1)
    db_connect_timeout: float = Field(5, gt=0)
    db_statement_timeout: float = Field(2, gt=0)
    ws_compression: bool = False
    personal_inbox_size: int = Field(100, ge=1)
    idempotency_ttl: float = Field(600, gt=0)
    # The HTTP edge (issue 9): timeouts against idle and half-sent requests, hosts, limits (PROTOCOL 3.11).
    http_head_timeout: float = Field(10, gt=0)
    http_body_timeout: float = Field(10, gt=0)
    http_body_deadline: float = Field(60, gt=0)
    http_keepalive_timeout: float = Field(75, gt=0)
    allowed_hosts: tuple[str, ...] = ()
    public_origin: str | None = None
    max_connections: int = Field(0, ge=0)
    max_connections_per_user: int = Field(0, ge=0)
    connect_rate: float = Field(0, ge=0)
    connect_burst: int = Field(0, ge=0)
    trusted_proxies: tuple[str, ...] = ()

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from realtime_service.limits import parse_networks

        parse_networks(value)
        return value

    @field_validator("public_origin")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.username:
            raise ValueError(f"{value!r} is not an origin like https://realtime.example.com[:port]")
        default = {"http": 80, "https": 443}[parts.scheme]
        port = "" if parts.port in (None, default) else f":{parts.port}"  # browsers leave a default port out
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{parts.scheme}://{host}{port}".lower()

    @field_validator("broker_encryption_keys")
    @classmethod
    def _usable_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from realtime_service.broker.sealing import Sealer

            Sealer.parse(value.get_secret_value())  # ValueError names the entry, never the key
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _libpq_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        # Checked here, not at the first connect: libpq's own message quotes the DSN, password and all.
        if value is None:
            return None
        from psycopg2.extensions import parse_dsn

        try:
            parts = parse_dsn(value.get_secret_value())
        except Exception:  # psycopg2.ProgrammingError; its text would quote the secret
            raise ValueError("not a PostgreSQL DSN: write postgresql://user:password@host:5432/dbname "
                             "(or libpq's key=value form)") from None
        port = parts.get("port")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("the DSN's port is not a number between 1 and 65535")
        return value

    @field_validator("ownership_query")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        # The query runs with {"diagnosis_id": N}; any other placeholder fails every connect at run time.
        names = set()
        for match in _PLACEHOLDER.finditer(value):
            if match.group("kind") == "%" and match.group("name") is None:
                continue  # %% is a literal percent sign
            shown = match.group(0)
            if match.group("kind") != "s" or match.group("name") is None:
                raise ValueError(f"placeholder {shown!r} is not supported; write %(diagnosis_id)s")
            names.add(match.group("name"))
        unknown = sorted(names - {"diagnosis_id"})
        if unknown:
            raise ValueError(f"unknown placeholder %({unknown[0]})s; the only one is %(diagnosis_id)s")
        if not names:
            raise ValueError("the query must use %(diagnosis_id)s, or every diagnosis would get the same owner")
        return value

    @field_validator("ownership_batch_query")
    @classmethod
    def _batch_placeholder(cls, value: str) -> str:
        # Runs with {"diagnosis_ids": [N, ...]} (a PostgreSQL array); empty turns batching off.
        if not value.strip():
            return ""
        names = set()
        for match in _PLACEHOLDER.finditer(value):
            if match.group("kind") == "%" and match.group("name") is None:
                continue
            if match.group("kind") != "s" or match.group("name") != "diagnosis_ids":
                raise ValueError(f"placeholder {match.group(0)!r} is not supported; write %(diagnosis_ids)s")
            names.add(match.group("name"))
        if not names:
            raise ValueError("the batch query must use %(diagnosis_ids)s (an array of ids), or be empty to ask "
                             "one diagnosis per query")
        return value

    def batch_query_in_use(self) -> str | None:
        """The batch ownership query, if it applies: a custom ownership_query with the default batch query (which
        reads another table) would answer from the wrong place, so batching is then off until both are set."""
        if not self.ownership_batch_query:
            return None
        custom = self.ownership_query != DEFAULT_OWNERSHIP_QUERY
        if custom and self.ownership_batch_query == DEFAULT_OWNERSHIP_BATCH_QUERY:
            return None
        return self.ownership_batch_query

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        allowed = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256",
                   "PS384", "PS512", "EdDSA"}
        bad = [alg for alg in value if alg not in allowed]
        if bad or not value:
            raise ValueError(f"unsupported or empty algorithm list: {bad or 'empty'} (allowed: {sorted(allowed)})")
        return value

    @property
    def development(self) -> bool:
        return self.env == "development"

    def secret(self, name: Literal["database_url", "redis_url", "jwt_secret", "jwt_previous_secret",
                                   "broker_encryption_keys"]) -> str | None:
        """The clear value of a secret setting, for the one place that needs it."""
        value: SecretStr | None = getattr(self, name)
        return None if value is None else value.get_secret_value()


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    names = set(Settings.model_fields)
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in names:
            continue
        if raw == "" and name in OPTIONAL_FIELDS:
            continue  # an empty variable means "not set", as operators expect from REALTIME_REDIS_URL=""
        out[name] = raw
    return out


def env_name(name: str) -> str:
    """The environment variable of a setting: heartbeat -> REALTIME_HEARTBEAT."""
    return f"{ENV_PREFIX}{name.upper()}"


@dataclass(frozen=True)
class Source:
    """Where one setting's value came from, to name it in an error: the default, a command's default, a file, the
    environment or a flag."""

    kind: Literal["default", "command", "file", "environment", "flag"]
    name: str
    path: Path | None = None

    def describe(self, value: Any = None, *, show_value: bool = False) -> str:
        """`REALTIME_HEARTBEAT=inf in the environment`, `heartbeat = true in app.toml`, `--port 70000`..."""
        if self.kind == "environment":
            return env_name(self.name) + (f"={_shown(self.name, value)}" if show_value else "") + " in the environment"
        if self.kind == "file":
            return f"{self.name} = {_shown(self.name, value, toml=True)} in {self.path}" if show_value \
                else f"set in {self.path}"
        if self.kind == "flag":
            return f"--{self.name.replace('_', '-')}" + (f" {_shown(self.name, value)}" if show_value else "")
        where = "the command's default" if self.kind == "command" else "the default"
        return f"{self.name} = {_shown(self.name, value, toml=True)} ({where})" if show_value else where


def _is_secret(name: str) -> bool:
    info = Settings.model_fields.get(name)
    return info is not None and SecretStr in (info.annotation, *get_args(info.annotation))


def _shown(name: str, value: Any, *, toml: bool = False) -> str:
    if _is_secret(name):
        return "<hidden>"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = (json.dumps(value) if toml else value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _numeric(name: str) -> bool:
    info = Settings.model_fields[name]
    return bool({int, float} & {info.annotation, *get_args(info.annotation)})


@dataclass(frozen=True)
class Loaded:
    """Settings with the source of every value that did not come from the default, and warnings to log."""

    settings: Settings
    sources: Mapping[str, Source] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def source(self, name: str) -> Source:
        return self.sources.get(name, Source("default", name))

    def where(self, name: str) -> str:
        """The setting and where it came from, for a one-line error: `jwt_secret (REALTIME_JWT_SECRET in ...)`."""
        return self.source(name).describe()


def closest_setting(name: str) -> str | None:
    """The known setting whose name is nearest to a mistyped one (for "did you mean")."""
    found = difflib.get_close_matches(name.lower(), list(Settings.model_fields), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_env_warnings(environ: Mapping[str, str]) -> tuple[str, ...]:
    """One line per REALTIME_* variable that is no setting (a typo is otherwise silently ignored)."""
    known = {env_name(name) for name in Settings.model_fields} | KNOWN_ENV_NAMES
    lines = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key in known or key.startswith(KNOWN_ENV_PREFIXES):
            continue
        guess = closest_setting(key[len(ENV_PREFIX):])
        hint = f"; did you mean {env_name(guess)}?" if guess else "; every setting is listed in config/default.toml"
        lines.append(f"{key} is not a setting and is ignored{hint}")
    return tuple(lines)


def _layer_problems(values: Mapping[str, Any], sources: Mapping[str, Source]) -> list[str]:
    """Validate one layer on its own, so a bad value in the file is reported even when the environment hides it."""
    problems = []
    for name, value in values.items():
        if isinstance(value, bool) and _numeric(name):
            # TOML `heartbeat = true` would otherwise become 1 second.
            problems.append(f"{sources[name].describe(value, show_value=True)}: expected a number, not a boolean")
    try:
        Settings.model_validate(values)
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            if name in sources and not (isinstance(values.get(name), bool) and _numeric(name)):
                message = str(err["msg"]).removeprefix("Value error, ")
                problems.append(f"{sources[name].describe(values.get(name), show_value=True)}: {message}")
    return problems


def _cross_problems(loaded: Loaded) -> list[str]:
    settings = loaded.settings
    problems = []
    if settings.db_pool_min > settings.db_pool_max:
        problems.append(f"db_pool_min {settings.db_pool_min} ({loaded.where('db_pool_min')}) is above db_pool_max "
                        f"{settings.db_pool_max} ({loaded.where('db_pool_max')})")
    return problems


def load(environ: Mapping[str, str], config_file: Path | None = None, defaults: Mapping[str, Any] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Loaded:
    """Build settings from command defaults, then the TOML file, then the environment, then CLI flags.

    Each layer is validated on its own first, so every error names the key and the layer it came from.
    """
    layers: list[tuple[dict[str, Any], dict[str, Source]]] = []
    command = dict(defaults or {})
    layers.append((command, {name: Source("command", name) for name in command}))
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        unknown = sorted(set(data) - set(Settings.model_fields))
        if unknown:
            hints = [f"{key} (did you mean {guess}?)" if (guess := closest_setting(key)) else key for key in unknown]
            raise ConfigError(f"unknown setting(s) in {config_file}: {', '.join(hints)}")
        layers.append((data, {name: Source("file", name, Path(config_file)) for name in data}))
    env = _env_values(environ)
    layers.append((env, {name: Source("environment", name) for name in env}))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    layers.append((flags, {name: Source("flag", name) for name in flags}))

    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    problems: list[str] = []
    for layer, layer_sources in layers:
        for name in LIST_FIELDS & set(layer):
            layer[name] = _split(layer[name])
        problems += _layer_problems(layer, layer_sources)
        values.update(layer)
        sources.update(layer_sources)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:  # a rule about several settings at once
        raise ConfigError("invalid configuration: " + "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors())) from None
    loaded = Loaded(settings, sources, unknown_env_warnings(environ))
    problems = _cross_problems(loaded)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return loaded


def load_settings(environ: Mapping[str, str], config_file: Path | None = None,
                  defaults: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
                  ) -> Settings:
    """The settings alone (see `load` for their sources and warnings)."""
    return load(environ, config_file, defaults, overrides).settings
