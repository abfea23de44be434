"""The shipped config files: default.toml documents every setting at its default; the production example loads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from realtime_service.settings import Settings, load_settings

SETTING_LINE = re.compile(r"^(# )?[a-z_]+ = ")
CONFIG = Path(__file__).resolve().parent.parent / "config"


def test_default_toml_loads_to_exactly_the_defaults() -> None:
    loaded = load_settings({}, CONFIG / "default.toml")
    assert loaded == Settings()


def test_default_toml_documents_every_setting_with_a_comment() -> None:
    text = (CONFIG / "default.toml").read_text()
    lines = text.splitlines()
    for name in Settings.model_fields:
        at = [i for i, line in enumerate(lines) if re.match(rf"^(# )?{name} = ", line)]
        assert at, f"{name} is not in config/default.toml"
        above = at[0] - 1
        while above >= 0 and SETTING_LINE.match(lines[above]):
            above -= 1  # settings documented together share the comment above the group
        assert above >= 0, f"{name} has no comment above it"
        assert lines[above].startswith("# "), f"{name} has no comment above it"
    assert set(tomllib.loads(text)) <= set(Settings.model_fields)


def test_default_toml_commented_values_are_the_defaults_or_examples_of_unset_ones() -> None:
    defaults = Settings()
    for line in (CONFIG / "default.toml").read_text().splitlines():
        match = re.match(r"^# ([a-z_]+) = (.*)$", line)
        if match is None or match.group(1) not in Settings.model_fields:
            continue
        name, value = match.group(1), tomllib.loads(f"v = {match.group(2)}")["v"]
        default = getattr(defaults, name)
        assert default is None or name in {"host", "env", "console_enabled"}, name
        if name in {"host", "env", "console_enabled"}:
            assert value == default, name  # the `serve` default, written out


def test_production_example_loads_and_is_production() -> None:
    settings = load_settings({}, CONFIG / "production.example.toml")
    assert settings.env == "production"
    assert not settings.development
    assert settings.console_enabled is False
    assert settings.jwt_algorithms == ("RS256",)
    assert settings.jwt_secret is None
    assert settings.database_url is None


def test_environment_overrides_the_file() -> None:
    settings = load_settings({"REALTIME_PORT": "9000", "REALTIME_DATABASE_URL": "postgresql://r@h/db"},
                             CONFIG / "production.example.toml")
    assert settings.port == 9000
    assert settings.secret("database_url") == "postgresql://r@h/db"
