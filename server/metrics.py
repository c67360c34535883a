"""`GET /metrics`: what the server is doing, in the Prometheus text format.

One registry per app (tests and embedders run several apps in one process). Counters on
the per-event path are pre-bound to their labels, so an event costs one increment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class Tally:
    """A count on the hottest path (a frame written straight to a socket, see
    `server.direct`): a plain int, added to its Counter at scrape time, because a
    prometheus-client Counter takes a lock per increment."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


class Metrics:
    """The server's metrics (see module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "jobwire_connections", "Open client connections", ["transport"], registry=self.registry
        )
        deliveries = Counter(
            "jobwire_deliveries", "Job events sent to clients", ["transport"], registry=self.registry
        )
        self.ws_deliveries = deliveries.labels("websocket")
        self.sse_deliveries = deliveries.labels("sse")
        self.ws_written = Tally()  # websocket deliveries written directly, not yet counted below
        self.direct_writes = Counter(
            "jobwire_direct_writes",
            "Websocket deliveries written as ready-made frames (from the hub's dispatch, or joined)",
            registry=self.registry,
        )
        self._events = Counter(
            "jobwire_events", "Job events received from Redis, by state", ["state"], registry=self.registry
        )
        self.hub_reconnects = Gauge(
            "jobwire_hub_reconnects", "Times the hub lost Redis and reconnected", registry=self.registry
        )
        self.redis_latency = Gauge(
            "jobwire_redis_ping_seconds",
            "Round trip of a PING to Redis, at scrape time",
            registry=self.registry,
        )
        self.rejected = Counter(
            "jobwire_refused_connections",
            "Connections refused by a limit",
            ["reason"],
            registry=self.registry,
        )
        self.coalesced = Counter(
            "jobwire_coalesced_events",
            "Progress events a slow client got only as a newer one (marked `coalesced`)",
            registry=self.registry,
        )
        self.slow_closed = Counter(
            "jobwire_slow_clients_closed",
            "Clients closed (1013) for falling too far behind or accepting nothing",
            ["transport"],
            registry=self.registry,
        )
        self._by_state: dict[str, Any] = {}

    def flush(self) -> None:
        """Add the plain counts to their Counters (at scrape time)."""
        written = self.ws_written.take()
        self.ws_deliveries.inc(written)
        self.direct_writes.inc(written)

    def event(self, state: str) -> None:
        counter = self._by_state.get(state)
        if counter is None:
            counter = self._by_state[state] = self._events.labels(state)
        counter.inc()

    def connection(self, transport: str) -> Callable[[], None]:
        """Count one open connection; return what uncounts it."""
        gauge = self.connections.labels(transport)
        gauge.inc()
        return gauge.dec


async def metrics(request: Request) -> Response:
    svc = request.app.state.jobwire
    svc.metrics.flush()
    svc.metrics.hub_reconnects.set(svc.hub.reconnects)
    started = time.perf_counter()
    try:
        await svc.redis.ping()
        svc.metrics.redis_latency.set(time.perf_counter() - started)
    except RedisError:
        svc.metrics.redis_latency.set(float("nan"))
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics, methods=["GET"])]
