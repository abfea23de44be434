"""Prometheus metrics on a registry owned by one app (no global registry): bounded labels only.

No label carries a diagnosis or user id or a token, so the number of series never grows with traffic and a
scrape never leaks a secret. Known label values are created up front, so a rate() over them exists (at zero)
before the first event and alerts do not need `absent()`.

Under `serve --workers N` (PROTOCOL 5.4) each worker process writes its values to files in the directory named by
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, switched on by that variable when the library is
imported), and a scrape answered by any worker reads every worker's files: counters and histograms are summed
over the machine (a dead worker's counts included, so rates never jump back), gauges are summed over the live
workers. A gauge computed at scrape time (set_function) cannot work there, since the answering worker cannot
call into the others: those gauges are sampled by each worker instead (`sample()`, run every second).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from realtime_service import __version__
from realtime_service.errors import CloseReason

FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CLOSE_REASONS = tuple(reason.reason for reason in CloseReason if reason.reason)
ATTEMPT_OUTCOMES = ("accepted", "origin_refused", "connect_rate_limited", "node_full", "closed", *CLOSE_REASONS)
DISCONNECT_REASONS = ("normal", "client", *CLOSE_REASONS)  # "client": the peer closed or vanished
PUBLISH_KINDS = ("broadcast", "personal")
LOOKUP_RESULTS = ("hit", "shared", "miss")
QUERY_RESULTS = ("ok", "unavailable")
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_INTERVAL = 1.0  # seconds between a worker's samples of its scrape-time gauges in multiprocess mode


def multiprocess_dir() -> str | None:
    """The directory prometheus-client writes per-process values to, or None in the ordinary one-process mode.

    Read from the environment because that is where prometheus-client itself takes the switch from (at import);
    reading it anywhere else could disagree with how the values are actually stored.
    """
    return os.environ.get(MULTIPROCESS_DIR_VARIABLE) or None


class Metrics:
    """Every metric the service exports; the attribute names are what the core increments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir()
        self._samplers: list[tuple[Gauge, Callable[[], float]]] = []
        r = self.registry
        self.info = Gauge("realtime_build_info", "Always 1; the running version as a label.", ["version"],
                          registry=r, multiprocess_mode="max")
        self.info.labels(__version__).set(1)
        self.connections = Gauge("realtime_connections", "Open WebSocket connections.", registry=r,
                                 multiprocess_mode="livesum")
        self.connection_attempts = Counter(
            "realtime_connection_attempts", "WebSocket connection attempts by outcome (accepted or close reason).",
            ["outcome"], registry=r)
        self.disconnects = Counter("realtime_disconnects", "Closed connections by reason.", ["reason"], registry=r)
        self.publishes = Counter("realtime_publishes", "Messages published, by kind.", ["kind"], registry=r)
        self.deliveries = Counter("realtime_deliveries", "Frames handed to connection outboxes.", registry=r)
        self.fanout_seconds = Histogram("realtime_fanout_seconds", "Time to hand one publication to local outboxes.",
                                        buckets=FAST_BUCKETS, registry=r)
        self.outbox_bytes = Gauge("realtime_outbox_bytes", "Bytes waiting in all connection outboxes.", registry=r,
                                  multiprocess_mode="livesum")
        self.slow_consumers = Counter("realtime_slow_consumer_closes", "Connections closed slow_consumer.",
                                      registry=r)
        self.ownership_seconds = Histogram("realtime_ownership_query_seconds", "Ownership queries to the replica.",
                                           ["result"], buckets=QUERY_BUCKETS, registry=r)
        self.ownership_lookups = Counter("realtime_ownership_lookups",
                                         "Ownership lookups: cache hit, shared in-flight query, or miss.",
                                         ["result"], registry=r)
        self.broker_errors = Counter("realtime_broker_errors", "Failed broker operations.", ["operation"],
                                     registry=r)
        self.broker_reconnects = Counter("realtime_broker_reconnects",
                                         "Times the broker's subscription connection was re-established.", registry=r)
        self.broker_gap_fills = Counter("realtime_broker_gap_fills",
                                        "Gaps in a diagnosis's offsets filled from the broker's history.", registry=r)
        self.broker_catchups = Counter("realtime_broker_catchups",
                                       "Served diagnoses caught up from history after a reconnect.", registry=r)
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

    @property
    def multiprocess(self) -> bool:
        """True when values live in per-process files shared by the workers of one machine."""
        return self.multiprocess_dir is not None

    def track_outbox_bytes(self, read: Callable[[], float]) -> None:
        """Compute the outbox gauge when scraped (or sampled, with workers), not on every frame."""
        self._track(self.outbox_bytes, read)

    def _track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        if self.multiprocess:
            self._samplers.append((gauge, read))
        else:
            gauge.set_function(read)

    def sample(self) -> None:
        """Write this process's scrape-time gauges to its files (multiprocess mode; a no-op otherwise)."""
        for gauge, read in self._samplers:
            gauge.set(read())

    async def run_sampler(self, interval: float = SAMPLE_INTERVAL) -> None:
        """Sample until cancelled, so a scrape on another worker sees this one's values at most `interval` old."""
        while True:
            self.sample()
            await asyncio.sleep(interval)

    def render(self) -> bytes:
        """The Prometheus text format for `GET /metrics`: this registry, or with workers the whole machine's."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.sample()  # the answering worker's own values are exact, not up to a second old
        machine = CollectorRegistry()
        MultiProcessCollector(machine, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(machine)
