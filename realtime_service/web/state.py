"""Typed application keys: everything a handler needs hangs off the app, built in the app factory."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from realtime_service.metrics import Metrics
from realtime_service.node import Node
from realtime_service.settings import Settings
from realtime_service.web.transport import Flusher


@dataclass(slots=True)
class AppState:
    """Wiring of one app: settings, the node core, metrics."""

    settings: Settings
    node: Node
    metrics: Metrics
    demo_tokens: dict[str, str] = field(default_factory=dict)
    flusher: Flusher = field(default_factory=Flusher)


STATE = web.AppKey("realtime_state", AppState)
