"""`GET /client/realtime.js` and `/client/realtime.d.ts`: the browser client, served by the service (PROTOCOL 9).

The files are read once when the app is built and answered from memory with a strong ETag, so browsers
revalidate cheaply (`no-cache` + `If-None-Match` -> 304) and pick up a new version right after a deploy. Apps on
other origins import the module, and module scripts are fetched in CORS mode, so the answer allows any origin:
it is public code and carries no credentials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

CLIENT_DIR = Path(__file__).parent / "static" / "client"
FILES = {"realtime.js": "text/javascript", "realtime.d.ts": "application/typescript"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(folder: Path = CLIENT_DIR) -> dict[str, Asset]:
    """Every client file with its ETag (a hash of its bytes, so it changes exactly when the file does)."""
    assets: dict[str, Asset] = {}
    for name, content_type in FILES.items():
        body = (folder / name).read_bytes()
        assets[name] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


def _matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    candidates = {part.strip().removeprefix("W/") for part in header.split(",")}
    return "*" in candidates or etag in candidates


def setup_client_routes(app: web.Application) -> None:
    """Mount the client files on `app`."""
    assets = load_assets()

    def handler_for(asset: Asset) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            headers = {"ETag": asset.etag, "Cache-Control": "public, no-cache",
                       "Access-Control-Allow-Origin": "*", "Cross-Origin-Resource-Policy": "cross-origin",
                       "X-Content-Type-Options": "nosniff", "Vary": "Accept-Encoding"}
            if _matches(request.headers.get("If-None-Match"), asset.etag):
                return web.Response(status=304, headers=headers)
            return web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8",
                                headers=headers)
        return handler

    for name, asset in assets.items():
        app.router.add_get(f"/client/{name}", handler_for(asset))
