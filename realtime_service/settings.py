"""Frozen settings: defaults <- TOML file <- REALTIME_* environment (PROTOCOL 8); secrets stay masked.

The environment is passed in, never read here, so two apps in one test can hold different settings.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "REALTIME_"
DEFAULT_OWNERSHIP_QUERY = "SELECT user_id FROM diagnoses WHERE id = %(diagnosis_id)s"
LIST_FIELDS = frozenset({"jwt_algorithms", "allowed_origins"})
OPTIONAL_FIELDS = frozenset({"database_url", "redis_url", "jwt_secret", "jwt_public_key_file", "jwt_audience",
                             "jwt_issuer"})


class ConfigError(Exception):
    """The configuration cannot be used; the message names the setting."""


class Settings(BaseModel):
    """Every setting of PROTOCOL 8. Durations are seconds, sizes bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    env: Literal["production", "development"] = "production"
    database_url: SecretStr | None = None
    redis_url: SecretStr | None = None
    jwt_secret: SecretStr | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key_file: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = Field(10, ge=0)
    heartbeat: float = Field(30, gt=0)
    history_size: int = Field(100, ge=1)
    history_ttl: float = Field(86400, gt=0)
    ownership_query: str = DEFAULT_OWNERSHIP_QUERY
    ownership_cache_ttl: float = Field(5, ge=0)
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

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

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

    def secret(self, name: Literal["database_url", "redis_url", "jwt_secret"]) -> str | None:
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


def load_settings(environ: Mapping[str, str], config_file: Path | None = None,
                  defaults: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
                  ) -> Settings:
    """Build settings from command defaults, then the TOML file, then the environment, then CLI flags."""
    values: dict[str, Any] = dict(defaults or {})
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        unknown = sorted(set(data) - set(Settings.model_fields))
        if unknown:
            raise ConfigError(f"unknown setting(s) in {config_file}: {', '.join(unknown)}")
        values.update(data)
    values.update(_env_values(environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for name in LIST_FIELDS & set(values):
        values[name] = _split(values[name])
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"][:1])
            problems.append(f"{name} ({ENV_PREFIX}{name.upper()}): {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
