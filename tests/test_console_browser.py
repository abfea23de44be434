"""The debug console (PROTOCOL 6) driven in real headless Chromium: connect, watch frames, ping, publish, resume,
and never let a token reach the DOM, a URL or web storage."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from realtime_service.client import Publisher
from realtime_service.web.state import STATE
from tests.client_support import RestartableService
from tests.fixtures_app import StartService
from tests.support import Seeder, Tokens

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 10_000


def chromium_path() -> str:
    """Debian's Chromium (tests/run.sh installs it); never a browser downloaded by playwright."""
    path = os.environ.get("REALTIME_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("chromium is not installed: run `bash tests/run.sh` or `apt-get install -y chromium`",
                    pytrace=False)
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class Watch:
    """What a page did that a user cannot see: requested URLs, WebSocket URLs, script errors, console errors."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("websocket", lambda ws: self.urls.append(ws.url))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)


async def assert_no_token_anywhere(page: Page, watch: Watch, *tokens: str) -> None:
    """No token in the DOM (markup, text, attributes, input values), the URL, requested URLs or web storage."""
    html = await page.content()
    text = await page.evaluate("document.body.innerText")
    values = await page.evaluate(
        "[...document.querySelectorAll('input, textarea, select')].map(e => e.value).join('\\n')")
    attributes = await page.evaluate(
        "[...document.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.value)).join('\\n')")
    storage = await page.evaluate("[localStorage.length, sessionStorage.length]")
    for token in tokens:
        for where, content in (("markup", html), ("text", text), ("input values", values),
                               ("attributes", attributes), ("URL", page.url), ("requests", "\n".join(watch.urls))):
            assert token not in content, f"a token is visible in the page's {where}"
    assert storage == [0, 0]
    assert "token" not in page.url


def row(page: Page, type_: str, offset: int | None = None) -> Any:
    selector = f'#frame-rows tr[data-type="{type_}"]'
    if offset is not None:
        selector += f'[data-offset="{offset}"]'
    return page.locator(selector)


async def test_console_connects_publishes_pings_and_resumes_without_exposing_tokens(
        start_service: StartService, browser: Browser) -> None:
    service = await start_service(console_enabled=True, env="development")
    uid, did = service.seed.owned()
    user_token, service_token = service.tokens.user(uid), service.tokens.service()
    page = await browser.new_page()
    watch = Watch(page)
    response = await page.goto(f"{service.base_url}/console")
    assert response is not None
    assert response.status == 200
    assert "script-src 'self'" in (await response.all_headers())["content-security-policy"]
    await expect(page.locator("#user-token-held")).to_have_text("none held")

    await page.fill("#user-token", user_token)
    await page.fill("#diagnosis", str(did))
    await page.click("#connect")
    await expect(row(page, "connect", 0)).to_have_count(1, timeout=WAIT_MS)
    await expect(page.locator("#conn-state")).to_have_text("connected")
    await expect(page.locator("#user-token")).to_have_value("")
    await expect(page.locator("#user-token-held")).to_have_text("held in memory")
    await expect(row(page, "connect")).to_contain_text(f'"user_id":{uid}')

    await page.fill("#service-token", service_token)
    await page.fill("#publish-type", "herb_update")
    await page.fill("#publish-data", '{"herb": "mint"}')
    await page.click("#publish")
    await expect(page.locator("#publish-result")).to_have_text(
        "Published: offset 1, handed to 1 connection(s).", timeout=WAIT_MS)
    await expect(row(page, "herb_update", 1)).to_contain_text('{"herb":"mint"}', timeout=WAIT_MS)
    await expect(page.locator("#total-connections")).to_have_text("1", timeout=WAIT_MS)
    await expect(page.locator("#fact-diagnosis")).to_contain_text("offset 1", timeout=WAIT_MS)

    await service.publish(did, "feedback_note", {"rating": 5})  # from outside: arrives live
    await expect(row(page, "feedback_note", 2)).to_have_count(1, timeout=WAIT_MS)
    await page.click("#ping")
    await expect(row(page, "pong")).to_have_count(1, timeout=WAIT_MS)

    await page.click("#disconnect")
    await expect(page.locator("#conn-state")).to_have_text("disconnected")
    await service.publish(did, "missed_while_away", {"n": 3})
    await page.click("#resume")
    await expect(row(page, "reconnect_messages")).to_contain_text('"recovered":true', timeout=WAIT_MS)
    await expect(row(page, "missed_while_away", 3)).to_have_count(1)
    await expect(row(page, "connect")).to_have_count(2)
    await expect(page.locator("#fact-offset")).to_have_text("3")

    await assert_no_token_anywhere(page, watch, user_token, service_token)
    ws_url = f"{service.base_url.replace('http', 'ws', 1)}/ws/{did}"
    assert [url for url in watch.urls if url.startswith("ws")] == [ws_url, ws_url]  # no token, no query
    assert not watch.errors, watch.errors
    await page.close()


async def test_bad_token_shows_the_close_reason(start_service: StartService, browser: Browser) -> None:
    service = await start_service(console_enabled=True, env="development")
    _uid, did = service.seed.owned()
    stranger = service.tokens.user(service.seed.user())
    page = await browser.new_page()
    await page.goto(f"{service.base_url}/console")
    await page.fill("#user-token", stranger)
    await page.fill("#diagnosis", str(did))
    await page.click("#connect")
    await expect(row(page, "closed")).to_contain_text('"code":1008', timeout=WAIT_MS)
    await expect(page.locator("#conn-state")).to_have_text("closed: forbidden")
    await page.close()


async def test_development_prefills_demo_tokens_without_rendering_them(
        start_service: StartService, browser: Browser) -> None:
    service = await start_service(console_enabled=True, env="development")
    uid, did = service.seed.owned()
    demo = {"user": service.tokens.user(uid), "service": service.tokens.service(sub="dev-console"),
            "diagnosis_id": str(did)}
    service.app[STATE].demo_tokens = demo
    page = await browser.new_page()
    watch = Watch(page)
    await page.goto(f"{service.base_url}/console")
    await expect(page.locator("#diagnosis")).to_have_value(str(did))
    await expect(page.locator("#user-token")).to_have_attribute("type", "password")
    await expect(page.locator("#user-token")).to_have_value("")
    await expect(page.locator("#user-token-held")).to_have_text("demo token held")
    await expect(page.locator("#service-token-held")).to_have_text("demo token held")
    await assert_no_token_anywhere(page, watch, demo["user"], demo["service"])  # the JSON block is gone

    await page.click("#connect")
    await expect(row(page, "connect", 0)).to_have_count(1, timeout=WAIT_MS)
    await page.click("#publish")
    await expect(row(page, "console_test", 1)).to_contain_text("hello from the console", timeout=WAIT_MS)
    await assert_no_token_anywhere(page, watch, demo["user"], demo["service"])
    assert not watch.errors, watch.errors
    await page.close()


async def test_production_sign_in_in_the_browser(start_service: StartService, browser: Browser) -> None:
    service = await start_service(console_enabled=True, env="production")
    user_token, service_token = service.tokens.user(service.seed.user()), service.tokens.service()
    context = await browser.new_context()
    page = await context.new_page()
    watch = Watch(page)
    response = await page.goto(f"{service.base_url}/console")
    assert response is not None
    assert response.status == 401
    await page.fill("#token", user_token)
    await page.click("button[type=submit]")
    await expect(page.locator(".error")).to_have_text("That is not a valid service token.")
    assert not await context.cookies()

    await page.fill("#token", service_token)
    await page.click("button[type=submit]")
    await expect(page.locator("#connect")).to_be_visible(timeout=WAIT_MS)
    assert page.url == f"{service.base_url}/console"
    cookies = await context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"], c["path"]) for c in cookies] == [
        ("rt_console", True, "Strict", "/console")]
    assert await page.evaluate("document.cookie") == ""
    await expect(page.locator("#user-token-held")).to_have_text("none held")  # production never prefills
    await assert_no_token_anywhere(page, watch, user_token, service_token)

    await page.click(".signout button")
    await expect(page.locator("#token")).to_be_visible(timeout=WAIT_MS)
    assert not await context.cookies()
    await context.close()


async def test_console_empty_state_and_totals_read_right(start_service: StartService, browser: Browser) -> None:
    """Issue 12 item 10: no "enter a token" prompt beside a held demo token; totals are pluralised and say
    which diagnoses they count (the watched ones), so "0 diagnoses watched" beside "1 retained message" reads
    right."""
    service = await start_service(console_enabled=True, env="development")
    uid, did = service.seed.owned()
    service.app[STATE].demo_tokens = {"user": service.tokens.user(uid), "service": service.tokens.service(),
                                      "diagnosis_id": str(did)}
    page = await browser.new_page()
    await page.goto(f"{service.base_url}/console")
    await expect(page.locator("#user-token-held")).to_have_text("demo token held")
    await expect(page.locator("#frames-empty")).to_have_text(
        f"No frames yet. Press Connect to watch diagnosis {did} as the demo user.")
    await service.publish(did, "note", {})
    await expect(page.locator("#total-retained")).to_have_text("1", timeout=WAIT_MS)
    await expect(page.locator("#total-retained-label")).to_have_text("retained message")
    await expect(page.locator("#total-diagnoses")).to_have_text("0")
    await expect(page.locator("#total-diagnoses-label")).to_have_text("diagnoses watched")
    await expect(page.locator("#total-connections-label")).to_have_text("connections")
    await page.click("#connect")
    await expect(page.locator("#total-connections")).to_have_text("1", timeout=WAIT_MS)
    await expect(page.locator("#total-connections-label")).to_have_text("connection")
    await expect(page.locator("#total-diagnoses-label")).to_have_text("diagnosis watched")
    await service.publish(did, "note", {})
    await expect(page.locator("#total-retained-label")).to_have_text("retained messages", timeout=WAIT_MS)
    await page.close()

    other = await browser.new_page()  # nothing held: then the console asks for a token
    service.app[STATE].demo_tokens = {}
    await other.goto(f"{service.base_url}/console")
    await expect(other.locator("#frames-empty")).to_have_text(
        "No frames yet. Enter a user token and a diagnosis, then connect.")
    await other.close()


async def test_console_reconnects_and_resumes_by_itself(pg_dsn: str, seed: Seeder, tokens: Tokens,
                                                        browser: Browser) -> None:
    """The console runs on /client/realtime.js: a node restart (1012) is followed by a reconnect that resumes
    from the last offset, with nothing missed and nothing twice."""
    service = RestartableService(pg_dsn, console_enabled=True, env="development")
    await service.start()
    try:
        uid, did = seed.owned()
        page = await browser.new_page()
        await page.goto(f"{service.base_url}/console")
        await page.fill("#user-token", tokens.user(uid))
        await page.fill("#diagnosis", str(did))
        await page.click("#connect")
        await expect(page.locator("#conn-state")).to_have_text("connected", timeout=WAIT_MS)
        async with Publisher(service.base_url, tokens.service()) as rt:
            await rt.publish(did, "before", {})
            await expect(row(page, "before", 1)).to_have_count(1, timeout=WAIT_MS)
            await service.stop()
            # the first close is the restart's; the module reconnects at once, and an attempt while the node is
            # down may add another "closed" row
            await expect(row(page, "closed").first).to_contain_text('"code":1012', timeout=WAIT_MS)
            await service.start()
            await rt.publish(did, "while_away", {})
            # The console keeps the module's default backoff (0.5 s doubling, full jitter): a few attempts
            # may fail while the node is down, so the way back can take several seconds.
            await expect(page.locator("#conn-state")).to_have_text("connected", timeout=4 * WAIT_MS)
            await rt.publish(did, "after", {})
        await expect(row(page, "after", 3)).to_have_count(1, timeout=WAIT_MS)
        await expect(row(page, "while_away", 2)).to_have_count(1)
        await expect(row(page, "connect")).to_have_count(2)
        await expect(page.locator("#fact-offset")).to_have_text("3")
        auth = row(page, "auth").nth(1)
        await expect(auth).to_contain_text('"since":1')
        await page.close()
    finally:
        await service.stop(drain=False)
