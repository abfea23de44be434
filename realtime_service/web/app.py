"""The app factory: the one place where settings become objects, and where their lifecycle is tied to the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from realtime_service.auth.ownership import OwnershipChecker, OwnershipSource
from realtime_service.auth.replica import PostgresOwnership
from realtime_service.auth.tokens import TokenVerifier
from realtime_service.broker.base import Broker
from realtime_service.broker.memory import MemoryBroker
from realtime_service.cluster import Cluster, SharedCluster
from realtime_service.hub import Hub
from realtime_service.limits import ConnectionCounter
from realtime_service.metrics import Metrics
from realtime_service.node import Limits, Node
from realtime_service.protocol.frames import REPLAY_OVERHEAD
from realtime_service.settings import ConfigError, Settings
from realtime_service.web import openapi, ops, rest
from realtime_service.web.client_assets import setup_client_routes
from realtime_service.web.http import error_middleware
from realtime_service.web.state import STATE, AppState
from realtime_service.web.ws import close_sockets, websocket_handler

log = logging.getLogger("realtime.app")

ID = r"{diagnosis_id:[1-9][0-9]{0,18}}"  # bigint; larger values are refused by diagnosis_id_of


def history_budget(settings: Settings) -> int:
    """Bytes of frames a broker keeps per diagnosis: the replay frame around them must fit history_max_bytes."""
    return settings.history_max_bytes - REPLAY_OVERHEAD


def build_broker(settings: Settings, metrics: Metrics) -> Broker:
    """Memory by default; Redis only when configured (imported only then)."""
    redis_url = settings.secret("redis_url")
    if redis_url is None:
        return MemoryBroker(settings.history_size, settings.history_ttl, settings.personal_inbox_size,
                            settings.idempotency_ttl, history_max_bytes=history_budget(settings))
    from realtime_service.broker.redis import RedisBroker

    def events(event: str, detail: str) -> None:
        if event == "error":
            metrics.broker_errors.labels(detail).inc()
        elif event == "reconnect":
            metrics.broker_reconnects.inc()
        elif event == "gap_fill":
            metrics.broker_gap_fills.inc()
        elif event == "catchup":
            metrics.broker_catchups.inc()

    from realtime_service.broker.sealing import Sealer

    keys = settings.secret("broker_encryption_keys")
    try:
        return RedisBroker(redis_url, prefix=settings.redis_prefix, history_size=settings.history_size,
                           history_max_bytes=history_budget(settings), history_ttl=settings.history_ttl,
                           inbox_size=settings.personal_inbox_size, idempotency_ttl=settings.idempotency_ttl,
                           timeout=settings.redis_timeout, events=events,
                           sealer=Sealer.parse(keys) if keys else None)
    except ValueError as exc:  # redis-py's answer to a URL it cannot use; never echo the URL (it may hold a password)
        raise ConfigError(f"REALTIME_REDIS_URL cannot be used: {str(exc).split(':')[0]}") from None


def build_cluster(settings: Settings, broker: Broker, metrics: Metrics
                  ) -> tuple[Callable[[Hub], Cluster] | None, ConnectionCounter | None]:
    """With Redis, presence, control messages and the per-user connection count are shared by every node;
    alone, the hub answers and the edge counts locally."""
    if settings.redis_url is None:
        return None, None
    from realtime_service.broker.redis import RedisBroker

    if not isinstance(broker, RedisBroker):
        return None, None
    from realtime_service.broker.presence import RedisConnectionCounter, RedisPresence

    node_id = uuid.uuid4().hex[:12]
    # A node counts as alive while its beat is younger than 1.5 heartbeats: a dead one's entries vanish within 2.
    store = RedisPresence(broker, node_id, liveness=1.5 * settings.heartbeat)
    return (lambda hub: SharedCluster(hub, store, beat_every=settings.heartbeat / 4,
                                      on_error=lambda: metrics.broker_errors.labels("presence").inc()),
            RedisConnectionCounter(store, key_ttl=settings.history_ttl))


def build_ownership_source(settings: Settings, metrics: Metrics) -> OwnershipSource:
    dsn = settings.secret("database_url")
    if not dsn:
        raise ConfigError("REALTIME_DATABASE_URL (the read replica) is required")
    return PostgresOwnership(
        dsn, settings.ownership_query, settings.db_pool_min, settings.db_pool_max, settings.db_connect_timeout,
        settings.db_statement_timeout,
        observe=lambda result, seconds: metrics.ownership_seconds.labels(result).observe(seconds),
        batch_query=settings.batch_query_in_use())


def build_verifier(settings: Settings) -> TokenVerifier:
    try:
        return TokenVerifier(settings.jwt_algorithms, settings.secret("jwt_secret"), settings.jwt_public_key_file,
                             settings.jwt_audience, settings.jwt_issuer, settings.jwt_leeway,
                             previous_secret=settings.secret("jwt_previous_secret"),
                             jwks_file=settings.jwt_jwks_file)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None


def create_app(settings: Settings, *, ownership_source: OwnershipSource | None = None,
               broker: Broker | None = None, connection_counter: ConnectionCounter | None = None
               ) -> web.Application:
    """Build one service app. Tests pass their own source or broker at the seams; a cluster passes a counter
    of every user's connections over all nodes (REALTIME_MAX_CONNECTIONS_PER_USER), else it is counted here."""
    metrics = Metrics()
    source = ownership_source or build_ownership_source(settings, metrics)
    ownership = OwnershipChecker(source, settings.ownership_cache_ttl,
                                 on_lookup=lambda result: metrics.ownership_lookups.labels(result).inc(),
                                 batch_window=settings.ownership_batch_window)
    chosen = broker or build_broker(settings, metrics)
    cluster, shared_counter = build_cluster(settings, chosen, metrics)
    connection_counter = connection_counter or shared_counter
    node = Node(chosen, ownership, build_verifier(settings), metrics,
                Limits(settings.outbox_max_bytes, settings.outbox_max_messages, settings.history_max_bytes),
                cluster=cluster)
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[STATE] = AppState(settings=settings, node=node, metrics=metrics, connection_counter=connection_counter)
    app.router.add_get(f"/ws/{ID}", websocket_handler)
    app.router.add_post("/ws/broadcast-recommendation-update", rest.broadcast_recommendation)
    app.router.add_post("/ws/broadcast-effectiveness-update", rest.broadcast_effectiveness)
    app.router.add_post("/ws/broadcast-feedback-update", rest.broadcast_feedback)
    app.router.add_get("/ws/status", rest.status)
    app.router.add_post("/api/v1/publish", rest.publish)
    app.router.add_post("/api/v1/publish/batch", rest.publish_batch)
    app.router.add_get(f"/api/v1/diagnoses/{ID}/presence", rest.presence)
    app.router.add_get(f"/api/v1/diagnoses/{ID}/deliveries", rest.deliveries)
    app.router.add_post(f"/api/v1/diagnoses/{ID}/revoke", rest.revoke)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)
    app.router.add_get("/api/openapi.json", openapi.document)
    openapi.setup(app)
    setup_client_routes(app)
    if settings.console_enabled:
        from realtime_service.web.console import setup_console

        setup_console(app)
    app.on_shutdown.append(close_sockets)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _heartbeat(node: Node, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        node.heartbeat_tick()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start the broker and the heartbeat with the app; stop them (and the replica pool) with it."""
    state = app[STATE]
    node = state.node
    await node.broker.start()
    await node.cluster.start()
    heartbeat = asyncio.create_task(_heartbeat(node, state.settings.heartbeat))
    # With workers, each samples its scrape-time gauges for the scrapes its siblings answer (metrics.py).
    sampler = asyncio.create_task(state.metrics.run_sampler()) if state.metrics.multiprocess else None
    try:
        yield
    finally:
        for task in (heartbeat, sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await node.cluster.close()
        await node.broker.close()
        await node.ownership.source.close()
