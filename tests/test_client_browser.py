"""The browser module /client/realtime.js (PROTOCOL 9) in real headless Chromium against the live service:
receive and ack, resume across a restart without a gap or a duplicate, onHistoryLost before what follows,
in-band token refresh, a terminal close stops it with an error, and no token in a URL, storage or the DOM.
Also its pure functions (close-code table, backoff, token expiry), checked against the Python client's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from playwright.async_api import Browser, Page, async_playwright

from realtime_service.client import policy
from tests.client_support import CuttingProxy, RestartableService, ServeProcess
from tests.support import Seeder, Tokens
from tests.test_console_browser import CHROMIUM_ARGS, Watch, assert_no_token_anywhere, chromium_path

pytestmark = pytest.mark.browser
WAIT = 10.0

HARNESS = """async ({url, diagnosisId, device, persist}) => {
  const m = await import('/client/realtime.js');
  window.__log = [];
  const push = (kind, value) => window.__log.push({kind, value: JSON.parse(JSON.stringify(value ?? null))});
  window.__client = m.connect({url, diagnosisId, device, persist, backoff: {baseMs: 50, capMs: 300},
    token: () => window.nextToken(),
    onMessage: (frame) => push('message', frame),
    onHistoryLost: (lost) => push('lost', lost),
    onState: (s) => push('state', Object.assign({}, s, {error: s.error ? s.error.reason : undefined})),
    onError: (e) => push('error', {reason: e.reason, code: e.code, name: e.name}),
    onFrame: (r) => {
      if (r.direction === 'out' && (r.frame.type === 'auth' || r.frame.type === 'ack')) push(r.frame.type, r.frame);
      if (r.direction === 'in' && r.frame && r.frame.type === 'reconnect_messages') {
        push('replay', r.frame.data.messages.map((m) => m.message_id || m.offset));
      }
    },
  });
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def services(pg_dsn: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[RestartableService] = []

    async def start(**overrides: Any) -> RestartableService:
        service = RestartableService(pg_dsn, **overrides)
        service.overrides.setdefault("allowed_origins", (service.base_url,))
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop(drain=False)


class Tab:
    """One page running the module; `log` is what the callbacks saw."""

    def __init__(self, page: Page, service: RestartableService | ServeProcess, token: Callable[[], str]) -> None:
        self.page = page
        self.service = service
        self.token = token
        self.watch = Watch(page)
        self.sockets: list[str] = []
        page.on("websocket", lambda ws: self.sockets.append(ws.url))

    async def open(self, diagnosis_id: int, device: str = "tab-1", persist: bool = False,
                   url: str | None = None) -> None:
        await self.page.expose_function("nextToken", self.token)
        await self.page.route("**/favicon.ico", lambda route: route.fulfill(status=204))  # not ours to serve
        await self.page.goto(f"{self.service.base_url}/healthz")
        await self.page.evaluate(HARNESS, {"url": url or self.service.ws_base, "diagnosisId": diagnosis_id,
                                           "device": device, "persist": persist})

    async def log(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.page.evaluate("window.__log")
        return result

    async def wait(self, predicate: Callable[[list[dict[str, Any]]], Any], what: str,
                   timeout: float = WAIT) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            log = await self.log()
            if predicate(log):
                return log
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; log tail {log[-6:]}")
            await asyncio.sleep(0.05)

    async def messages(self) -> list[dict[str, Any]]:
        return [e["value"] for e in await self.log() if e["kind"] == "message"]

    async def wait_offsets(self, expected: list[int]) -> None:
        def enough(log: list[dict[str, Any]]) -> bool:
            return len([e for e in log if e["kind"] == "message"]) >= len(expected)
        await self.wait(enough, f"offsets {expected}")
        assert [m["offset"] for m in await self.messages()] == expected

    async def wait_live(self, count: int = 1) -> None:
        await self.wait(lambda log: states(log).count("live") >= count, f"live #{count}")


def states(log: list[dict[str, Any]]) -> list[str]:
    return [e["value"]["state"] for e in log if e["kind"] == "state"]


async def publish(service: RestartableService | ServeProcess, tokens: Tokens, did: int, type_: str,
                  data: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            f"{service.base_url}/api/v1/publish", json={"diagnosis_id": did, "type": type_, "data": data},
            headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def test_module_is_served_with_an_etag_and_cors(services: Callable[..., Any]) -> None:
    service = await services()
    async with aiohttp.ClientSession() as http:
        for name, kind in (("realtime.js", "text/javascript"), ("realtime.d.ts", "application/typescript")):
            async with http.get(f"{service.base_url}/client/{name}") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith(kind)
                etag = resp.headers["ETag"]
                assert etag.startswith('"') and len(etag) > 10
                assert resp.headers["Cache-Control"] == "public, no-cache"
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                body = await resp.text()
                assert "export function connect" in body
            async with http.get(f"{service.base_url}/client/{name}", headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304
                assert await resp.read() == b""
            async with http.get(f"{service.base_url}/client/{name}", headers={"If-None-Match": '"other"'}) as resp:
                assert resp.status == 200


CLOSE_TABLE = [(1008, "invalid_token"), (1008, "forbidden"), (1008, "diagnosis_not_found"),
               (1008, "token_expired"), (1008, "auth_timeout"), (1008, "rate_limited"),
               (1008, "too_many_connections"), (1009, ""), (1011, "internal_error"), (1012, "service_restart"),
               (1013, "ownership_unavailable"), (1013, "broker_unavailable"), (1013, "slow_consumer"),
               (1006, ""), (1000, ""), (1001, "heartbeat_timeout"), (4000, "gap")]
EXPECTED_ACTIONS = ["stop", "stop", "stop", "refresh", "backoff", "backoff", "backoff", "backoff", "backoff",
                    "now", "backoff", "backoff", "backoff", "backoff", "backoff", "backoff", "now"]


def test_python_close_table_and_backoff() -> None:
    assert [policy.close_action(c, r).value for c, r in CLOSE_TABLE] == EXPECTED_ACTIONS
    ceilings = [policy.backoff_ceiling(n) for n in range(8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert policy.backoff_ceiling(10_000) == 20.0
    assert policy.backoff_delay(3, random=lambda: 0.0) == 0.0
    assert policy.backoff_delay(3, random=lambda: 0.5) == 2.0
    assert policy.reconnect_delay(policy.CloseAction.NOW, 0) == 0.0
    assert policy.reconnect_delay(policy.CloseAction.REFRESH, 0) == 0.0
    assert policy.reconnect_delay(policy.CloseAction.NOW, 2, random=lambda: 0.5) == 1.0
    assert policy.reconnect_delay(policy.CloseAction.STOP, 0) is None
    assert policy.reconnect_delay(policy.CloseAction.BACKOFF, 0, random=lambda: 0.999) < 0.5
    assert policy.refresh_delay(3600, 0) == 3540
    assert policy.refresh_delay(5, 0) == 4
    assert policy.refresh_delay(0.5, 0) == 0
    token = jwt.encode({"sub": "1", "exp": 1_900_000_000}, "k" * 32, algorithm="HS256")
    assert policy.token_expiry(token) == 1_900_000_000
    assert policy.token_expiry("garbage") is None
    assert policy.token_expiry("a.b.c") is None


async def test_js_close_table_backoff_and_expiry_match_python(services: Callable[..., Any],
                                                              browser: Browser) -> None:
    service = await services()
    page = await browser.new_page()
    await page.goto(f"{service.base_url}/healthz")
    token = jwt.encode({"sub": "1", "exp": 1_900_000_000}, "k" * 32, algorithm="HS256")
    result = await page.evaluate("""async ({table, token}) => {
      const m = await import('/client/realtime.js');
      const seq = (values) => { let i = 0; return () => values[i++ % values.length]; };
      return {
        actions: table.map(([code, reason]) => m.closeAction(code, reason)),
        ceilings: [0, 1, 2, 3, 4, 5, 6, 7].map((n) => m.backoffCeiling(n)),
        huge: m.backoffCeiling(10000),
        jitter: [m.backoffDelay(3, undefined, seq([0])), m.backoffDelay(3, undefined, seq([0.5]))],
        reconnect: [m.reconnectDelay("now", 0), m.reconnectDelay("refresh", 0),
                    m.reconnectDelay("now", 2, undefined, seq([0.5])), m.reconnectDelay("stop", 0),
                    m.reconnectDelay("backoff", 0, undefined, seq([0.999]))],
        refresh: [m.refreshDelay(3600000, 0), m.refreshDelay(5000, 0), m.refreshDelay(500, 0)],
        expiry: [m.tokenExpiry(token), m.tokenExpiry("garbage"), m.tokenExpiry("a.b.c")],
        terminal: m.TERMINAL_REASONS,
      };
    }""", {"table": CLOSE_TABLE, "token": token})
    assert result["actions"] == EXPECTED_ACTIONS
    assert result["ceilings"] == [int(policy.backoff_ceiling(n) * 1000) for n in range(8)]
    assert result["huge"] == 20000
    assert result["jitter"] == [0, 2000]
    assert result["reconnect"][:4] == [0, 0, 1000, None]
    assert result["reconnect"][4] < 500
    assert result["refresh"] == [3540000, 4000, 0]
    assert result["expiry"] == [1_900_000_000, None, None]
    assert sorted(result["terminal"]) == sorted(policy.TERMINAL_REASONS)
    await page.close()


async def test_js_drops_repeats_and_repairs_a_gap_by_resuming(services: Callable[..., Any],
                                                               browser: Browser) -> None:
    """With a scripted WebSocket: duplicate offsets and repeated message_ids are dropped; a gap closes the
    socket and the next one resumes from the last offset handed over."""
    service = await services()
    page = await browser.new_page()
    await page.goto(f"{service.base_url}/healthz")
    result = await page.evaluate("""async () => {
      const m = await import('/client/realtime.js');
      const sockets = [];
      class FakeSocket {
        constructor(url) { this.url = url; this.sent = []; this.readyState = 0; sockets.push(this);
          setTimeout(() => { this.readyState = 1; this.onopen(); }, 0); }
        send(data) { this.sent.push(JSON.parse(data)); }
        close(code, reason) { this.readyState = 3; this.closedWith = [code, reason]; }
        recv(frame) { this.onmessage({data: JSON.stringify(frame)}); }
      }
      const until = async (check) => {
        for (let i = 0; i < 200 && !check(); i++) await new Promise((r) => setTimeout(r, 5));
      };
      const got = [];
      const b = (offset, epoch = "e1") => ({type: "note", diagnosis_id: 5, data: {}, timestamp: "t", offset, epoch});
      const p = (id) => ({type: "nudge", diagnosis_id: 5, user_id: 9, message_id: id, data: {}, timestamp: "t"});
      const client = m.connect({url: "ws://service.invalid", diagnosisId: 5, token: "a.b.c", WebSocket: FakeSocket,
        onMessage: (f) => got.push(f.offset ?? f.message_id), backoff: {baseMs: 1, capMs: 2}, pingAfterMs: 0,
        ack: false});
      await until(() => sockets.length && sockets[0].sent.length);
      const one = sockets[0];
      one.recv({type: "connect", diagnosis_id: 5, data: {offset: 2, epoch: "e1", session: "s1"}});
      one.recv(b(3)); one.recv(b(3)); one.recv(b(2));
      one.recv(p("m1")); one.recv(p("m1")); one.recv(p("m2"));
      one.recv(b(5));  // 4 is missing
      await until(() => sockets.length === 2 && sockets[1].sent.length);
      const two = sockets[1];
      two.recv({type: "connect", diagnosis_id: 5, data: {offset: 5, epoch: "e1", session: "s2"}});
      two.recv({type: "reconnect_messages", diagnosis_id: 5,
                data: {messages: [b(4), b(5), p("m1"), p("m3")], recovered: true}});
      two.recv(b(5)); two.recv(b(6));
      const auths = sockets.map((s) => Object.assign({}, s.sent[0], {token: s.sent[0].token === "a.b.c"}));
      client.close();
      return {got, auths, url: one.url, closed: one.closedWith, position: client.position, state: client.state};
    }""")
    assert result["url"] == "ws://service.invalid/ws/5"
    assert result["got"] == [3, "m1", "m2", 4, 5, "m3", 6]
    assert result["closed"] == [4000, "gap"]
    assert result["auths"] == [
        {"type": "auth", "token": True, "device": "default"},
        {"type": "auth", "token": True, "device": "default", "since": 3, "epoch": "e1"}]
    assert result["position"] == {"offset": 6, "epoch": "e1"}
    assert result["state"] == "closed"
    await page.close()


async def test_module_receives_acks_and_keeps_tokens_out_of_urls_storage_and_dom(
        services: Callable[..., Any], browser: Browser, seed: Seeder, tokens: Tokens) -> None:
    service = await services()
    uid, did = seed.owned()
    issued: list[str] = []

    def token() -> str:
        issued.append(tokens.user(uid))
        return issued[-1]

    tab = Tab(await browser.new_page(), service, token)
    await tab.open(did, device="tab-ack", persist=True)
    await tab.wait_live()
    for n in range(3):
        await publish(service, tokens, did, "note", {"n": n})
    await tab.wait_offsets([1, 2, 3])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{service.base_url}/api/v1/diagnoses/{did}/deliveries",
                                headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
                devices = {d["device"]: d["confirmed_offset"] for d in (await resp.json())["devices"]}
            if devices.get("tab-ack") == 3:
                break
            assert loop.time() < deadline, f"the ack never arrived: {devices}"
            await asyncio.sleep(0.1)
    stored = await tab.page.evaluate("Object.keys(localStorage).map(k => [k, localStorage.getItem(k)])")
    assert len(stored) == 1 and '"offset":3' in stored[0][1]  # the position is persisted...

    # ...so a reload resumes from it exactly (since/epoch in the auth frame), not from the device's cursor.
    await tab.page.evaluate("window.__client.close()")
    await publish(service, tokens, did, "while_reloading", {})
    await tab.page.reload()
    await tab.page.evaluate(HARNESS, {"url": service.ws_base, "diagnosisId": did, "device": "tab-ack",
                                      "persist": True})
    await tab.wait_offsets([4])
    assert (await tab.messages())[0]["type"] == "while_reloading"
    auth = next(e["value"] for e in await tab.log() if e["kind"] == "auth")
    assert auth == {"type": "auth", "token": "•••", "device": "tab-ack", "since": 3,
                    "epoch": (await tab.messages())[0]["epoch"]}

    await tab.page.evaluate("localStorage.clear()")
    await assert_no_token_anywhere(tab.page, tab.watch, *issued)  # ...and no token, anywhere
    assert tab.sockets == [f"{service.ws_base}/ws/{did}"] * 2
    assert not tab.watch.errors, tab.watch.errors
    await tab.page.close()


async def test_restart_with_history_kept_gives_no_gap_and_no_duplicate(
        pg_dsn: str, redis_url: str, tmp_path: Path, browser: Browser, seed: Seeder, tokens: Tokens) -> None:
    """A deploy: the `serve` process on Redis is stopped (SIGTERM drains: 1012) and started again; publishes go
    on while it is down and after. The page gets every offset once, in order."""
    service = ServeProcess(pg_dsn, redis_url, tmp_path)
    await service.start()
    try:
        uid, did = seed.owned()
        tab = Tab(await browser.new_page(), service, lambda: tokens.user(uid))
        await tab.open(did)
        await tab.wait_live()
        for n in range(3):
            await publish(service, tokens, did, "before", {"n": n})
        await tab.wait_offsets([1, 2, 3])
        await service.stop()
        await tab.wait(lambda log: any(e["kind"] == "state" and e["value"].get("code") == 1012 for e in log),
                       "1012")
        await service.start()  # the same Redis: history kept
        for n in range(3, 6):
            await publish(service, tokens, did, "while_away", {"n": n})
        await tab.wait_live(2)
        for n in range(6, 8):
            await publish(service, tokens, did, "after", {"n": n})
        await tab.wait_offsets(list(range(1, 9)))
        assert [m["data"]["n"] for m in await tab.messages()] == list(range(8))
        log = await tab.log()
        assert not [e for e in log if e["kind"] in ("lost", "error")]
        reconnecting = [e["value"] for e in log if e["kind"] == "state" and e["value"]["state"] == "reconnecting"]
        assert reconnecting[0]["code"] == 1012 and reconnecting[0]["delay"] == 0  # at once after service_restart
        await tab.page.close()
    finally:
        await service.stop()


async def test_restart_that_loses_history_calls_on_history_lost_first(
        services: Callable[..., Any], browser: Browser, seed: Seeder, tokens: Tokens) -> None:
    service = await services()
    uid, did = seed.owned()
    tab = Tab(await browser.new_page(), service, lambda: tokens.user(uid))
    await tab.open(did)
    await tab.wait_live()
    first = await publish(service, tokens, did, "before", {})
    await tab.wait_offsets([1])
    await service.restart(keep_history=False)
    second = await publish(service, tokens, did, "after_restart", {})
    await tab.wait(lambda log: any(e["kind"] == "lost" for e in log), "onHistoryLost")
    await publish(service, tokens, did, "live_again", {})
    log = await tab.wait(lambda log: len([e for e in log if e["kind"] == "message"]) >= 3, "three messages")
    kinds = [(e["kind"], e["value"].get("type")) for e in log if e["kind"] in ("lost", "message")]
    assert kinds == [("message", "before"), ("lost", None), ("message", "after_restart"),
                     ("message", "live_again")]
    lost = next(e["value"] for e in log if e["kind"] == "lost")
    assert lost["previous"] == {"offset": 1, "epoch": first["epoch"]}
    assert lost["epoch"] == second["epoch"]
    assert [m["offset"] for m in await tab.messages()] == [1, 1, 2]
    await tab.page.close()


@pytest.mark.slow
async def test_token_about_to_expire_is_refreshed_in_band(services: Callable[..., Any], browser: Browser,
                                                          seed: Seeder, tokens: Tokens) -> None:
    service = await services(jwt_leeway=0)
    uid, did = seed.owned()
    issued: list[str] = []

    def token() -> str:  # the first token lives 3 s; the refresh gets an hour
        issued.append(tokens.user(uid, ttl=3 if not issued else 3600))
        return issued[-1]

    tab = Tab(await browser.new_page(), service, token)
    await tab.open(did)
    await tab.wait_live()
    first_exp = jwt.decode(issued[0], options={"verify_signature": False})["exp"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 6
    while len(issued) < 2:
        assert loop.time() < deadline, "no refresh before the token expired"
        await asyncio.sleep(0.05)
    assert time.time() < first_exp
    await asyncio.sleep(max(0.0, first_exp + 1.0 - time.time()))  # past the first exp (leeway 0)
    await publish(service, tokens, did, "after_expiry", {})
    await tab.wait_offsets([1])
    assert states(await tab.log()) == ["connecting", "live"]  # no reconnect
    assert len(tab.sockets) == 1
    assert service.node.hub.count == 1
    await tab.page.close()


async def test_forbidden_stops_with_an_error(services: Callable[..., Any], browser: Browser, seed: Seeder,
                                             tokens: Tokens) -> None:
    service = await services()
    _uid, did = seed.owned()
    stranger = tokens.user(seed.user())
    tab = Tab(await browser.new_page(), service, lambda: stranger)
    await tab.open(did)
    log = await tab.wait(lambda log: any(e["kind"] == "error" for e in log), "onError")
    error = next(e["value"] for e in log if e["kind"] == "error")
    assert error == {"reason": "forbidden", "code": 1008, "name": "RealtimeError"}
    await asyncio.sleep(0.5)  # a retry would come within the 300 ms backoff cap
    log = await tab.log()
    assert states(log) == ["connecting", "closed"]
    assert log[-2]["value"] == {"state": "closed", "code": 1008, "reason": "forbidden", "error": "forbidden"}
    assert len(tab.sockets) == 1
    assert await tab.page.evaluate("window.__client.state") == "closed"
    await tab.page.close()


async def test_a_personal_message_sent_again_after_a_drop_reaches_on_message_once(
        services: Callable[..., Any], browser: Browser, seed: Seeder, tokens: Tokens) -> None:
    """The service keeps a personal message until a connection confirms it; the first connection is cut right
    after it arrived, so the next one gets it again, and the module drops the repeat by its message_id."""
    service = await services()
    uid, did = seed.owned()
    async with aiohttp.ClientSession() as http, http.post(
            f"{service.base_url}/api/v1/publish", json={"diagnosis_id": did, "type": "nudge", "data": {},
                                                       "user_id": uid},
            headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
        assert resp.status == 200
    proxy = CuttingProxy(service.port, b"reconnect_messages")
    await proxy.start()
    try:
        tab = Tab(await browser.new_page(), service, lambda: tokens.user(uid))
        await tab.open(did, url=f"ws://127.0.0.1:{proxy.port}")
        await tab.wait_live(2)
        await publish(service, tokens, did, "marker", {})
        await tab.wait(lambda log: len([e for e in log if e["kind"] == "message"]) >= 2, "the marker")
    finally:
        await proxy.close()
    assert proxy.cut == 1
    replays = [e["value"] for e in await tab.log() if e["kind"] == "replay"]
    assert len(replays) == 2 and replays[0] == replays[1] and len(replays[0]) == 1  # sent twice...
    assert [m["type"] for m in await tab.messages()] == ["nudge", "marker"]  # ...handed over once
    assert len(tab.sockets) == 2
    await tab.page.close()


async def test_an_acknowledged_personal_message_is_not_sent_again(services: Callable[..., Any], browser: Browser,
                                                                  seed: Seeder, tokens: Tokens) -> None:
    """The module acks after handing over a personal message, so the service drops it from the inbox: the
    user's next page load does not get it again."""
    service = await services()
    uid, did = seed.owned()
    async with aiohttp.ClientSession() as http, http.post(
            f"{service.base_url}/api/v1/publish", json={"diagnosis_id": did, "type": "nudge", "data": {},
                                                       "user_id": uid},
            headers={"Authorization": f"Bearer {tokens.service()}"}) as resp:
        assert resp.status == 200
    first = Tab(await browser.new_page(), service, lambda: tokens.user(uid))
    await first.open(did, device="one")
    await first.wait(lambda log: any(e["kind"] == "ack" for e in log), "the ack")
    assert [m["type"] for m in await first.messages()] == ["nudge"]
    await first.page.close()
    second = Tab(await browser.new_page(), service, lambda: tokens.user(uid))
    await second.open(did, device="two")
    await second.wait_live()
    await publish(service, tokens, did, "marker", {})
    await second.wait(lambda log: any(e["kind"] == "message" for e in log), "the marker")
    assert [m["type"] for m in await second.messages()] == ["marker"]
    await second.page.close()
