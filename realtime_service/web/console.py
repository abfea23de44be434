"""The debug console `GET /console` (PROTOCOL 6): open in development, behind a service token in production.

Browsers cannot send an Authorization header when they navigate, so production answers 401 with a sign-in form
that trades a service token for a short-lived HttpOnly, SameSite=Strict session cookie. The token itself is never
rendered back into a page.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from realtime_service.errors import ServiceError
from realtime_service.web.state import STATE

COOKIE = "rt_console"
SESSION_TTL = 3600.0
SESSIONS = web.AppKey("console_sessions", dict)
TEMPLATES = Path(__file__).parent / "templates"


def setup_console(app: web.Application) -> None:
    """Mount the console routes and their templates on the app."""
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True)
    app[SESSIONS] = {}
    app.router.add_get("/console", console_page)
    app.router.add_post("/console/session", console_sign_in)
    app.router.add_post("/console/sign-out", console_sign_out)


def _signed_in(request: web.Request) -> bool:
    state = request.app[STATE]
    if state.settings.development:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        try:
            return state.node.verify(token.strip()).is_service
        except ServiceError:
            return False
    session = request.cookies.get(COOKIE)
    sessions: dict[str, float] = request.app[SESSIONS]
    expires = sessions.get(session or "")
    if expires is None:
        return False
    if expires < time.time():
        sessions.pop(session or "", None)
        return False
    return True


def _no_store(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


async def console_page(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not _signed_in(request):
        response = aiohttp_jinja2.render_template("signin.html", request, {"error": None}, status=401)
        return _no_store(response)
    context = {"development": state.settings.development, "demo": state.demo_tokens,
               "heartbeat": state.settings.heartbeat}
    return _no_store(aiohttp_jinja2.render_template("console.html", request, context))


async def console_sign_in(request: web.Request) -> web.StreamResponse:
    """Trade a service token (form field `token`) for a session cookie; redirect back to the console."""
    form = await request.post()
    token = form.get("token")
    state = request.app[STATE]
    ok = False
    if isinstance(token, str) and token.strip():
        try:
            ok = state.node.verify(token.strip()).is_service
        except ServiceError:
            ok = False
    if not ok:
        response = aiohttp_jinja2.render_template("signin.html", request,
                                                  {"error": "That is not a valid service token."}, status=401)
        return _no_store(response)
    session = secrets.token_urlsafe(32)
    sessions: dict[str, float] = request.app[SESSIONS]
    now = time.time()
    for key in [k for k, exp in sessions.items() if exp < now]:
        del sessions[key]
    sessions[session] = now + SESSION_TTL
    response = web.HTTPSeeOther("/console")
    response.set_cookie(COOKIE, session, max_age=int(SESSION_TTL), httponly=True, samesite="Strict",
                        path="/console", secure=request.secure)
    return _no_store(response)


async def console_sign_out(request: web.Request) -> web.StreamResponse:
    request.app[SESSIONS].pop(request.cookies.get(COOKIE, ""), None)
    response = web.HTTPSeeOther("/console")
    response.del_cookie(COOKIE, path="/console")
    return _no_store(response)
