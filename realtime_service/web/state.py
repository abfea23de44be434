"""Typed application keys: everything a handler needs hangs off the app, built in the app factory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

from aiohttp import web

from realtime_service.expiry import ExpiryHeap
from realtime_service.limits import (
    ConnectionCounter,
    ConnectRateLimiter,
    LocalConnectionCounter,
    Network,
    parse_networks,
)
from realtime_service.logs import Repeats
from realtime_service.metrics import Metrics
from realtime_service.node import Node
from realtime_service.settings import Settings
from realtime_service.web.hosts import known_hosts
from realtime_service.web.websocket import Flusher, WebSocket


@dataclass(slots=True)
class EdgeState:
    """The HTTP edge's limits (PROTOCOL 3.11): connect rate per address, WebSockets open on this node, per user."""

    connect_rate: ConnectRateLimiter
    trusted_proxies: tuple[Network, ...]
    counter: ConnectionCounter
    websockets: int = 0  # upgraded and not yet closed: authenticating or live
    known_hosts: frozenset[str] = frozenset()  # Host names development answers (web.hosts)
    served: Callable[[object], None] | None = None  # tells the head deadline a request head arrived

    @classmethod
    def from_settings(cls, settings: Settings, counter: ConnectionCounter | None = None) -> EdgeState:
        return cls(ConnectRateLimiter(settings.connect_rate, settings.connect_burst),
                   parse_networks(settings.trusted_proxies), counter or LocalConnectionCounter(),
                   known_hosts=known_hosts(settings))


@dataclass(slots=True)
class AppState:
    """Wiring of one app: settings, the node core, metrics."""

    settings: Settings
    node: Node
    metrics: Metrics
    demo_tokens: dict[str, str] = field(default_factory=dict)
    flusher: Flusher = field(default_factory=Flusher)
    expiries: ExpiryHeap = field(default_factory=ExpiryHeap)  # token expiry of every connection, one timer
    repeats: Repeats = field(default_factory=Repeats)  # folds repeated client-fault log lines
    sockets: set[WebSocket] = field(default_factory=set)  # upgraded and not yet closed: aiohttp no longer knows them
    closing: set[asyncio.Task[None]] = field(default_factory=set)  # live connections' ends (release, close)
    all_closed: asyncio.Event | None = None  # set when the last socket closed, once shutdown waits for it
    connection_counter: InitVar[ConnectionCounter | None] = None  # the per-user count; local unless given
    edge: EdgeState = field(init=False)

    def __post_init__(self, connection_counter: ConnectionCounter | None) -> None:
        self.edge = EdgeState.from_settings(self.settings, connection_counter)


STATE = web.AppKey("realtime_state", AppState)
