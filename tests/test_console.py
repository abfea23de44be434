"""The console's HTTP side (PROTOCOL 6): off unless enabled, open in development, behind a service token (header
or an HttpOnly SameSite=Strict session cookie) in production, with a strict Content-Security-Policy."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

import pytest

from realtime_service.web.state import STATE
from tests.fixtures_app import Service, StartService

SIGN_IN_FORM = re.compile(r'<form method="post" action="/console/session"[^>]*>.*<input[^>]*type="password"'
                          r'[^>]*name="token"', re.S)


async def get_console(service: Service, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    async with service.http.get(f"{service.base_url}/console", headers=headers or {},
                                allow_redirects=False) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def sign_in(service: Service, token: str, headers: dict[str, str] | None = None
                  ) -> tuple[int, str, SimpleCookie]:
    async with service.http.post(f"{service.base_url}/console/session", data={"token": token},
                                 headers=headers or {}, allow_redirects=False) as resp:
        cookies: SimpleCookie = SimpleCookie()
        for header in resp.headers.getall("Set-Cookie", []):
            cookies.load(header)
        return resp.status, resp.headers.get("Location", ""), cookies


@pytest.fixture
async def production(start_service: StartService) -> Service:
    return await start_service(console_enabled=True, env="production")


async def test_disabled_console_is_404(start_service: StartService) -> None:
    service = await start_service(env="development")  # console_enabled defaults to false
    for path in ("/console", "/console/static/console.js", "/console/session"):
        async with service.http.get(service.base_url + path) as resp:
            assert resp.status == 404, path


async def test_production_without_auth_is_401_html_with_a_sign_in_form(production: Service) -> None:
    status, body, headers = await get_console(production)
    assert status == 401
    assert headers["Content-Type"].startswith("text/html")
    assert SIGN_IN_FORM.search(body), body
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "<style" not in body
    assert "<script" not in body


async def test_production_accepts_a_service_bearer_and_refuses_a_user_token(production: Service) -> None:
    status, body, _ = await get_console(production, {"Authorization": f"Bearer {production.tokens.service()}"})
    assert status == 200
    assert 'id="connect-form"' in body
    user = production.tokens.user(production.seed.user())
    status, body, _ = await get_console(production, {"Authorization": f"Bearer {user}"})
    assert status == 401
    assert SIGN_IN_FORM.search(body)
    status, _, _ = await get_console(production, {"Authorization": "Bearer not-a-jwt"})
    assert status == 401


async def test_sign_in_sets_an_httponly_strict_cookie_that_opens_the_page(production: Service) -> None:
    token = production.tokens.service()
    status, location, cookies = await sign_in(production, token)
    assert (status, location) == (303, "/console")
    morsel = cookies["rt_console"]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/console"
    assert 0 < int(morsel["max-age"]) <= 3600
    assert token not in morsel.value
    assert not morsel["secure"]  # plain HTTP here; behind a TLS proxy it is Secure (next test)
    cookie = {"Cookie": f"rt_console={morsel.value}"}
    status, body, _headers = await get_console(production, cookie)
    assert status == 200
    assert 'id="connect-form"' in body
    assert token not in body

    async with production.http.post(f"{production.base_url}/console/sign-out", headers=cookie,
                                    allow_redirects=False) as resp:
        assert resp.status == 303
    status, _, _ = await get_console(production, cookie)
    assert status == 401


async def test_sign_in_refuses_user_tokens_garbage_and_other_sites(production: Service) -> None:
    user = production.tokens.user(production.seed.user())
    for token in (user, "garbage", ""):
        status, _, cookies = await sign_in(production, token)
        assert status in (401, 400)
        assert "rt_console" not in cookies
    status, _, cookies = await sign_in(production, production.tokens.service(),
                                       {"Origin": "https://evil.example"})
    assert status == 403
    assert "rt_console" not in cookies
    status, _, cookies = await sign_in(production, production.tokens.service(), {"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert "rt_console" not in cookies
    status, _, cookies = await get_console(production, {"Cookie": "rt_console=made-up"})
    assert status == 401


async def test_production_never_renders_demo_tokens(production: Service) -> None:
    secret = production.tokens.user(1)
    production.app[STATE].demo_tokens = {"user": secret, "service": secret, "diagnosis_id": "5"}
    _, body, _ = await get_console(production, {"Authorization": f"Bearer {production.tokens.service()}"})
    assert secret not in body


async def test_development_page_is_open_and_keeps_tokens_in_the_data_block_only(start_service: StartService
                                                                                ) -> None:
    service = await start_service(console_enabled=True, env="development")
    user, svc = service.tokens.user(7), service.tokens.service()
    service.app[STATE].demo_tokens = {"user": user, "service": svc, "diagnosis_id": "123"}
    status, body, headers = await get_console(service)
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    block = re.search(r'<script id="console-data" type="application/json">(.*?)</script>', body, re.S)
    assert block is not None
    assert user in block.group(1)
    assert svc in block.group(1)
    outside = body.replace(block.group(0), "")
    assert user not in outside
    assert svc not in outside
    assert re.search(r'<input id="user-token" type="password"(?![^>]*value=)', body)
    assert 'value="123"' in body  # the demo diagnosis is not a secret
    assert re.findall(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)", body) == []  # no inline code


async def test_static_assets_are_served(start_service: StartService) -> None:
    service = await start_service(console_enabled=True, env="development")
    _, body, _ = await get_console(service)
    for name, kind in (("console.js", "javascript"), ("console.css", "text/css")):
        url = re.search(rf'"(/console/static/{name}\?v=[^"]+)"', body)
        assert url is not None, name
        async with service.http.get(service.base_url + url.group(1)) as resp:
            assert resp.status == 200
            assert kind in resp.headers["Content-Type"]


async def test_cookie_is_secure_behind_a_tls_proxy(production: Service) -> None:
    status, _, cookies = await sign_in(production, production.tokens.service(), {"X-Forwarded-Proto": "https"})
    assert status == 303
    assert cookies["rt_console"]["secure"] is True
