"""Regenerate docs/console.png: run `realtime-service dev`, drive its console in headless Chromium, screenshot it.

Usage (from the repository root, with the package installed in .venv and Debian's chromium):
    .venv/bin/python docs/make_screenshot.py [--out docs/console.png]
It shows what an operator sees: the demo tokens held (not displayed), a live connection, a few frames with their
offsets (one published from the console's own form), a ping and the status totals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.async_api import async_playwright, expect

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_dev(workdir: Path, port: int) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start `realtime-service dev` and read the demo diagnosis and service token from its banner."""
    command = [str(ROOT / ".venv" / "bin" / "realtime-service"), "dev", "--port", str(port),
               "--data-dir", str(workdir / "dev")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    assert process.stdout is not None
    banner: dict[str, str] = {}
    expect_token = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "service" not in banner:
        line = process.stdout.readline()
        if not line:
            raise SystemExit("realtime-service dev exited before printing its banner")
        text = line.strip()
        if text.startswith("demo diagnoses:"):
            banner["diagnosis_id"] = text.split(":", 1)[1].split()[0]
        elif text.startswith("service token:"):
            expect_token = "service"
        elif expect_token and text:
            banner[expect_token] = text
            expect_token = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process, banner
        except OSError:
            time.sleep(0.1)
    raise SystemExit("realtime-service dev did not answer /healthz")


def post(port: int, token: str, path: str, body: dict[str, object]) -> None:
    """Publish the way the main API does: a POST with a service token."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


async def shoot(port: int, banner: dict[str, str], out: Path) -> None:
    chromium = os.environ.get("REALTIME_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    did = int(banner["diagnosis_id"])
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
        await page.goto(f"http://127.0.0.1:{port}/console")
        await page.click("#connect")
        await expect(page.locator('#frame-rows tr[data-type="connect"]')).to_have_count(1, timeout=10_000)
        post(port, banner["service"], "/ws/broadcast-recommendation-update",
             {"diagnosis_id": did, "old_data": {"herb": "valerian", "dose": "1 cup"},
              "new_data": {"herb": "chamomile", "dose": "1 cup"}, "reason": "better sleep reported"})
        post(port, banner["service"], "/ws/broadcast-effectiveness-update",
             {"diagnosis_id": did, "recommendation_id": 7, "herb": "chamomile", "new_effectiveness": 0.82,
              "old_effectiveness": 0.64, "confidence": 0.9, "sample_size": 41})
        await page.fill("#publish-type", "care_plan_note")
        await page.fill("#publish-data", '{"note": "evening routine updated", "by": "dr-lee"}')
        await page.click("#publish")
        await expect(page.locator('#frame-rows tr[data-type="care_plan_note"]')).to_have_count(1, timeout=10_000)
        await page.click("#ping")
        await expect(page.locator('#frame-rows tr[data-type="pong"]')).to_have_count(1, timeout=10_000)
        await expect(page.locator("#total-connections")).to_have_text("1", timeout=10_000)
        await page.locator("#frame-rows tr[data-type=effectiveness_update] summary").click()
        await page.screenshot(path=str(out))
        await browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="realtime-screenshot-"))
    workdir.chmod(0o755)  # as root, the embedded PostgreSQL's own user must reach its data folder
    port = free_port()
    process, banner = start_dev(workdir, port)
    try:
        asyncio.run(shoot(port, banner, args.out))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
