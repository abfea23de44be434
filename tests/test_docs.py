"""The documents agree with the code: the README's two commands, one close-code table, links that resolve, every
setting in docs/protocol.md, and nothing pointing outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from realtime_service.errors import CloseReason, close_code_table
from realtime_service.settings import Settings, env_name
from tests.fixtures_app import StartService

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROTOCOL = ROOT / "docs" / "protocol.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first, second = sh_blocks(text)[:2]
    assert first.strip() == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/realtime-service dev"
    assert second.strip() == "bash tests/run.sh"
    assert text.index("bash tests/run.sh") < text.index("## ")  # before any section
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec bash tests/run.sh")


def generated_block(path: Path) -> str:
    found = re.search(r"<!-- close-codes:start -->\n(.*?)<!-- close-codes:end -->", path.read_text(), re.DOTALL)
    assert found, f"{path.name} has no generated close-code table"
    return found.group(1)


@pytest.mark.parametrize("path", [README, PROTOCOL], ids=["README", "protocol"])
def test_close_code_tables_are_the_one_in_the_code(path: Path) -> None:
    assert generated_block(path) == close_code_table(), (
        f"{path.name} drifted from realtime_service/errors.py: paste the output of "
        "`python -m realtime_service.errors --markdown` between the close-codes markers")


def test_the_table_prints_from_the_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "realtime_service.errors", "--markdown"], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout == close_code_table()
    for member in CloseReason:
        assert f"| {member.code} | " in result.stdout


async def test_a_frame_over_the_limit_is_closed_as_the_table_says(start_service: StartService) -> None:
    service = await start_service(max_frame_bytes=1024)
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid))
    await client.next_of("connect")
    await client.send({"type": "ping", "pad": "x" * 4000})
    assert await client.wait_closed() == CloseReason.MESSAGE_TOO_BIG.code == 1009
    assert client.close_reason == CloseReason.MESSAGE_TOO_BIG.reason == "message_too_big"
    assert "| 1009 | `message_too_big` |" in README.read_text()


def repository_text_files() -> list[Path]:
    files = [README, *DOCS, ROOT / "Dockerfile", ROOT / "setup.cfg", *sorted((ROOT / "config").glob("*"))]
    files += sorted((ROOT / "realtime_service").rglob("*.py")) + sorted((ROOT / "realtime_service").rglob("*.html"))
    return [f for f in files if f.is_file()]


def test_nothing_links_to_or_loads_from_outside_the_repository() -> None:
    for path in repository_text_files():
        text = path.read_text(errors="replace")
        for bad in ("../shared", "/work/shared", "shared/PROTOCOL"):
            assert bad not in text, f"{path.relative_to(ROOT)} refers to {bad}"


@pytest.mark.parametrize("path", [README, *[d for d in DOCS if d != PROTOCOL]], ids=lambda p: p.name)
def test_every_document_links_to_the_protocol_reference(path: Path) -> None:
    targets = LINK.findall(path.read_text())
    expected = "docs/protocol.md" if path == README else "protocol.md"
    assert any(t.split("#")[0] == expected for t in targets), f"{path.name} does not link to {expected}"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or (target.startswith("#") and not target[1:]):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        assert resolved.exists(), f"{path.name}: dead link {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{path.name}: no heading #{anchor} in {resolved.name}"


def test_protocol_reference_names_every_setting() -> None:
    text = PROTOCOL.read_text()
    missing = [env_name(name) for name in Settings.model_fields if f"`{env_name(name)}`" not in text]
    assert not missing, f"docs/protocol.md does not document {missing}"


def test_protocol_reference_covers_what_issue_12_asks() -> None:
    headings = re.findall(r"^#+ (.+)$", PROTOCOL.read_text(), re.MULTILINE)
    for needed in ("Frames from the server", "Frames from the client", "Close codes", "Resuming",
                   "REST API", "Scale-out with Redis", "Workers on one machine", "Configuration"):
        assert any(h.startswith(needed) for h in headings), needed


def test_container_example_mounts_every_file_the_production_example_names() -> None:
    from realtime_service.preflight import file_settings
    from realtime_service.settings import load

    example = load({}, ROOT / "config" / "production.example.toml").settings
    named = [str(getattr(example, name)) for name in file_settings() if getattr(example, name)]
    assert named, "the production example names no file: nothing to check"
    block = next(b for b in sh_blocks(README.read_text()) if "production.example.toml" in b)
    for path in named:
        assert f":{path}:ro" in block, f"the README's container example does not mount {path}"
