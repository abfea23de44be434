"""Which Host a request may name and which Origin is the console's own: the guard against DNS rebinding.

A page on a rebinding domain (evil.example resolving to 127.0.0.1) is same-origin with whatever answers there,
so `dev` must refuse a Host it does not know, and the console's origin must come from configuration, never from
the request's own Host header.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from realtime_service.settings import Settings

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def host_name(host: str) -> str:
    """`Example.COM:8080` -> `example.com`, `[::1]:80` -> `::1`; the port does not matter."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def known_hosts(settings: Settings) -> frozenset[str]:
    """Loopback names, allowed_hosts, the public origin's host and the address `dev` was bound to."""
    names = set(LOOPBACK_HOSTS)
    names.update(host_name(h) for h in settings.allowed_hosts)
    if settings.public_origin:
        names.add(urlsplit(settings.public_origin).hostname or "")
    if settings.host not in ANY_ADDRESS:
        names.add(host_name(settings.host))
    names.discard("")
    return frozenset(names)


def host_allowed(request: web.BaseRequest, settings: Settings, known: frozenset[str]) -> bool:
    """In development only a known Host is answered; production answers any (the load balancer picks the host)."""
    if not settings.development:
        return True
    return host_name(request.host) in known


def console_origin_allowed(origin: str, request: web.BaseRequest, settings: Settings, known: frozenset[str]) -> bool:
    """The console's own origin: the configured public origin, or (a console opened on localhost or an allowed
    host) the scheme and Host the page was served under. Never a Host that configuration does not name."""
    origin = origin.lower().rstrip("/")
    if settings.public_origin and origin == settings.public_origin:
        return True
    if host_name(request.host) not in known:
        return False
    return origin == f"{request.scheme}://{request.host}".lower()
