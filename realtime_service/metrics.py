"""Prometheus metrics on a registry owned by one app (no global registry): bounded labels only.

No label carries a diagnosis or user id or a token, so the number of series never grows with traffic and a
scrape never leaks a secret. Known label values are created up front, so a rate() over them exists (at zero)
before the first event and alerts do not need `absent()`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from realtime_service import __version__
from realtime_service.errors import CloseReason

FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CLOSE_REASONS = tuple(reason.reason for reason in CloseReason if reason.reason)
ATTEMPT_OUTCOMES = ("accepted", "origin_refused", "closed", *CLOSE_REASONS)
DISCONNECT_REASONS = ("normal", "client", *CLOSE_REASONS)  # "client": the peer closed or vanished
PUBLISH_KINDS = ("broadcast", "personal")
LOOKUP_RESULTS = ("hit", "shared", "miss")
QUERY_RESULTS = ("ok", "unavailable")


class Metrics:
    """Every metric the service exports; the attribute names are what the core increments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge("realtime_build_info", "Always 1; the running version as a label.", ["version"],
                          registry=r)
        self.info.labels(__version__).set(1)
        self.connections = Gauge("realtime_connections", "Open WebSocket connections.", registry=r)
        self.connection_attempts = Counter(
            "realtime_connection_attempts", "WebSocket connection attempts by outcome (accepted or close reason).",
            ["outcome"], registry=r)
        self.disconnects = Counter("realtime_disconnects", "Closed connections by reason.", ["reason"], registry=r)
        self.publishes = Counter("realtime_publishes", "Messages published, by kind.", ["kind"], registry=r)
        self.deliveries = Counter("realtime_deliveries", "Frames handed to connection outboxes.", registry=r)
        self.fanout_seconds = Histogram("realtime_fanout_seconds", "Time to hand one publication to local outboxes.",
                                        buckets=FAST_BUCKETS, registry=r)
        self.outbox_bytes = Gauge("realtime_outbox_bytes", "Bytes waiting in all connection outboxes.", registry=r)
        self.slow_consumers = Counter("realtime_slow_consumer_closes", "Connections closed slow_consumer.",
                                      registry=r)
        self.ownership_seconds = Histogram("realtime_ownership_query_seconds", "Ownership queries to the replica.",
                                           ["result"], buckets=QUERY_BUCKETS, registry=r)
        self.ownership_lookups = Counter("realtime_ownership_lookups",
                                         "Ownership lookups: cache hit, shared in-flight query, or miss.",
                                         ["result"], registry=r)
        self.broker_errors = Counter("realtime_broker_errors", "Failed broker operations.", ["operation"],
                                     registry=r)
        self.http_requests = Counter("realtime_http_requests", "REST requests by route and status class.",
                                     ["route", "status"], registry=r)
        self._precreate()

    def _precreate(self) -> None:
        """Create the series of every known label value at zero, so dashboards and alerts see them from the start."""
        for outcome in ATTEMPT_OUTCOMES:
            self.connection_attempts.labels(outcome)
        for reason in DISCONNECT_REASONS:
            self.disconnects.labels(reason)
        for kind in PUBLISH_KINDS:
            self.publishes.labels(kind)
        for lookup in LOOKUP_RESULTS:
            self.ownership_lookups.labels(lookup)
        for result in QUERY_RESULTS:
            self.ownership_seconds.labels(result)

    def track_outbox_bytes(self, read: Callable[[], float]) -> None:
        """Compute the outbox gauge when scraped, not on every frame."""
        self.outbox_bytes.set_function(read)

    def render(self) -> bytes:
        """The registry in the Prometheus text format, for `GET /metrics`."""
        return generate_latest(self.registry)
