"""The debug console `GET /console` (PROTOCOL 6): open in development, behind a service token in production.

Browsers cannot send an Authorization header when they navigate, so production answers 401 with a sign-in form
that trades a service token for a short-lived HttpOnly, SameSite=Strict session cookie. No token is ever
rendered into a page (the development page hands its demo tokens to the script in a JSON block that the script
removes), and a Content-Security-Policy allows only the console's own script and stylesheet.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from realtime_service.errors import ServiceError
from realtime_service.web.hosts import console_origin_allowed
from realtime_service.web.state import STATE

COOKIE = "rt_console"
SESSION_TTL = 3600.0
MAX_SESSIONS = 1000
STATUS_POLL_SECONDS = 3
SESSIONS: web.AppKey[dict[str, float]] = web.AppKey("console_sessions")
TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
STATIC_ROUTE = "console_static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def setup_console(app: web.Application) -> None:
    """Mount the console routes, its templates and its static files on the app."""
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True)
    app[SESSIONS] = {}
    app.router.add_get("/console", console_page)
    app.router.add_post("/console/session", console_sign_in)
    app.router.add_post("/console/sign-out", console_sign_out)
    app.router.add_static("/console/static", STATIC, name=STATIC_ROUTE, append_version=True)


def _bearer_is_service(request: web.Request, token: str) -> bool:
    try:
        return request.app[STATE].node.verify(token.strip()).is_service
    except ServiceError:
        return False


def _signed_in(request: web.Request) -> bool:
    """Development is open; production needs a service token in the header or a live session cookie."""
    if request.app[STATE].settings.development:
        return True
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return _bearer_is_service(request, token)
    session = request.cookies.get(COOKIE, "")
    sessions = request.app[SESSIONS]
    expires = sessions.get(session)
    if expires is None:
        return False
    if expires < time.time():
        sessions.pop(session, None)
        return False
    return True


def _same_origin(request: web.Request) -> bool:
    """A form post from another site is refused (the cookie is SameSite=Strict; this covers sign-in itself).

    Browsers say where a request comes from (Sec-Fetch-Site, else Origin); a client that says neither is no
    browser, so no other site can be behind it.

    A page on a DNS-rebinding domain is "same-origin" with us as far as the browser knows, so an Origin must also
    be the console's own as configuration names it (web.hosts), never merely equal to the request's Host.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    state = request.app[STATE]
    return console_origin_allowed(origin, request, state.settings, state.edge.known_hosts)


def _https(request: web.Request) -> bool:
    """HTTPS here or at the TLS proxy in front; trusting the header only ever makes the cookie stricter."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _protect(response: web.StreamResponse) -> web.StreamResponse:
    """Keep console pages out of caches, history snapshots, referrers and frames; allow only our own assets."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"  # no-referrer would make our own form posts Origin: null
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CSP
    return response


def _assets(request: web.Request) -> dict[str, str]:
    static = request.app.router[STATIC_ROUTE]
    return {"css_url": str(static.url_for(filename="console.css")),
            "js_url": str(static.url_for(filename="console.js"))}


def _sign_in_page(request: web.Request, error: str | None) -> web.StreamResponse:
    context = {"error": error, **_assets(request)}
    return _protect(aiohttp_jinja2.render_template("signin.html", request, context, status=401))


async def console_page(request: web.Request) -> web.StreamResponse:
    """The console, or (production, not signed in) the 401 sign-in form."""
    state = request.app[STATE]
    if not _signed_in(request):
        return _sign_in_page(request, None)
    development = state.settings.development
    demo = dict(state.demo_tokens) if development else {}
    data: dict[str, Any] = {
        "development": development,
        "demo": {key: demo[key] for key in ("user", "service") if demo.get(key)},
        "statusPollSeconds": STATUS_POLL_SECONDS,
    }
    context = {"development": development, "env": state.settings.env, "data": data,
               "diagnosis_id": demo.get("diagnosis_id", ""), **_assets(request)}
    return _protect(aiohttp_jinja2.render_template("console.html", request, context))


async def console_sign_in(request: web.Request) -> web.StreamResponse:
    """Trade a service token (form field `token`) for a session cookie; redirect back to the console."""
    if not _same_origin(request):
        return _protect(web.Response(status=403, text="cross-site sign-in refused (behind a proxy, set "
                                                  "REALTIME_PUBLIC_ORIGIN to the console's origin)"))
    form = await request.post()
    token = form.get("token")
    if not isinstance(token, str) or not token.strip() or not _bearer_is_service(request, token):
        return _sign_in_page(request, "That is not a valid service token.")
    sessions = request.app[SESSIONS]
    now = time.time()
    for key in [k for k, expires in sessions.items() if expires < now]:
        del sessions[key]
    while len(sessions) >= MAX_SESSIONS:
        del sessions[next(iter(sessions))]  # oldest first: dicts keep insertion order
    session = secrets.token_urlsafe(32)
    sessions[session] = now + SESSION_TTL
    response = web.Response(status=303, headers={"Location": "/console"})
    response.set_cookie(COOKIE, session, max_age=int(SESSION_TTL), httponly=True, samesite="Strict",
                        path="/console", secure=_https(request))
    return _protect(response)


async def console_sign_out(request: web.Request) -> web.StreamResponse:
    """Forget the session and its cookie."""
    if not _same_origin(request):
        return _protect(web.Response(status=403, text="cross-site sign-out refused"))
    request.app[SESSIONS].pop(request.cookies.get(COOKIE, ""), None)
    response = web.Response(status=303, headers={"Location": "/console"})
    response.del_cookie(COOKIE, path="/console")
    return _protect(response)
