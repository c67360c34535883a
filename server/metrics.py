"""`GET /metrics`: what the server is doing, in the Prometheus text format.

It is for operators: it tells how busy the server is, and when each tenant's jobs move.
So it is served either on a listener of its own (`JOBWIRE_METRICS_ADDR`, an address the
operators' scraper reaches and clients do not; the main port then has no `/metrics`), or
on the main port to the admin scope only (when authentication is on; with
`JOBWIRE_AUTH=none` everything is open anyway).

A scrape costs Redis nothing: the latency gauge is the round trip of the hub's own
keepalive PING (every 5 s), so scrapers cannot add load on Redis however often they come.

One registry per app (tests and embedders run several apps in one process). Counts on
the per-event path (events received by state, deliveries by transport) are plain ints,
brought into their Counters at scrape time (`Metrics.flush`): a prometheus-client Counter
takes a lock per increment, which on that path cost more than the rest of the count. A
scrape reads the same names, labels and values as if each had been counted as it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from jobwire.server.services import Services


class Tally:
    """A count on the hottest path (a delivery, or a frame written straight to a socket,
    see `server.direct`): a plain int (`tally.n += 1`), added to its Counter at scrape
    time, because a prometheus-client Counter takes a lock per increment."""

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
        self._ws_deliveries = deliveries.labels("websocket")
        self._sse_deliveries = deliveries.labels("sse")
        # Deliveries not yet in the Counter above (see `flush`): sent as ASGI messages or
        # SSE text, and websocket frames written directly (also counted in `direct_writes`).
        self.ws_deliveries = Tally()
        self.sse_deliveries = Tally()
        self.ws_written = Tally()
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
        self.hub_health = Gauge(
            "jobwire_hub_health",
            "1 for the fan-out's state now: ok, degraded (some cluster shards out of reach) or down",
            ["state"],
            registry=self.registry,
        )
        self.redis_latency = Gauge(
            "jobwire_redis_ping_seconds",
            "Round trip of the hub's last keepalive PING to Redis (every 5 s); NaN while it is disconnected",
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
        self.input_coalesced = Counter(
            "jobwire_input_coalesced",
            "Progress events the hub, behind on its pub/sub input, replaced by a newer one before fan-out",
            registry=self.registry,
        )
        self.input_joined = Counter(
            "jobwire_input_joined",
            "Events the hub, behind on its pub/sub input, fanned out joined with others of their job "
            "(one write per watcher in sync)",
            registry=self.registry,
        )
        self._hub_seen: dict[str, int] = {}  # the hub's own counts at the last scrape
        self.slow_closed = Counter(
            "jobwire_slow_clients_closed",
            "Clients closed (1013) for falling too far behind or accepting nothing",
            ["transport"],
            registry=self.registry,
        )
        self._by_state: dict[str, Any] = {}  # state -> its pre-bound `_events` Counter
        self._events_by_state: dict[str, int] = {}  # events received since the last flush

    def flush(self) -> None:
        """Add the plain counts to their Counters (at scrape time)."""
        written = self.ws_written.take()
        self._ws_deliveries.inc(self.ws_deliveries.take() + written)
        self.direct_writes.inc(written)
        self._sse_deliveries.inc(self.sse_deliveries.take())
        counts, self._events_by_state = self._events_by_state, {}
        for state, n in counts.items():
            counter = self._by_state.get(state)
            if counter is None:
                counter = self._by_state[state] = self._events.labels(state)
            counter.inc(n)

    def take_hub_counts(self, coalesced: int, joined: int) -> None:
        """Bring the input counters up to the hub's own counts (plain ints on the read path)."""
        for name, counter, total in (
            ("coalesced", self.input_coalesced, coalesced),
            ("joined", self.input_joined, joined),
        ):
            seen = self._hub_seen.get(name, 0)
            counter.inc(max(0, total - seen))
            self._hub_seen[name] = max(total, seen)

    def event(self, state: str) -> None:
        """Count one event received from Redis (the hub's `on_event`): a plain int per
        state, into `jobwire_events` at the next scrape."""
        counts = self._events_by_state
        counts[state] = counts.get(state, 0) + 1

    def connection(self, transport: str) -> Callable[[], None]:
        """Count one open connection; return what uncounts it."""
        gauge = self.connections.labels(transport)
        gauge.inc()
        return gauge.dec


def exposition(svc: Services) -> Response:
    """The metrics as a scrape reads them. No Redis command: see the module docstring."""
    svc.metrics.flush()
    svc.metrics.hub_reconnects.set(svc.hub.reconnects)
    svc.metrics.take_hub_counts(svc.hub.input_coalesced, svc.hub.input_joined)
    health = svc.hub.health
    for state in ("ok", "degraded", "down"):
        svc.metrics.hub_health.labels(state).set(1 if state == health else 0)
    latency = svc.hub.ping_seconds if svc.hub.connected else None
    svc.metrics.redis_latency.set(float("nan") if latency is None else latency)
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def metrics(request: Request) -> Response:
    """`/metrics` on the main port: the admin scope's, when authentication is on."""
    svc: Services = request.app.state.jobwire
    svc.auth.require_admin(request)
    return exposition(svc)


routes = [Route("/metrics", metrics, methods=["GET"])]


class _Listener(uvicorn.Server):
    """A second uvicorn server in the app's event loop. The signals stay the main
    server's: it stops this one from the app's lifespan."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def listener(svc: Services, host: str, port: int) -> AsyncIterator[None]:
    """Serve `/metrics` (and nothing else) on `host:port` while the context is open."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # scrapers queue from now on, before uvicorn has started
    except OSError as exc:
        sock.close()
        raise OSError(f"JOBWIRE_METRICS_ADDR {host}:{port}: cannot listen there ({exc})") from None

    async def endpoint(request: Request) -> Response:
        return exposition(svc)

    app = Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])
    # No log_config: the main server's logging stays as it was configured.
    config = uvicorn.Config(app, lifespan="off", log_config=None, log_level=None, access_log=False)
    server = _Listener(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="jobwire-metrics")
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait({task})
        sock.close()
