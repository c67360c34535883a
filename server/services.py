"""The objects every endpoint uses, built once per app by the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from celery import Celery
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from jobwire.ratelimit import AsyncBuckets
from jobwire.server.auth import DEVELOPER, Auth, Principal
from jobwire.server.feed import Feed
from jobwire.server.hub import Fanout
from jobwire.server.limits import Connections, Refusal
from jobwire.server.metrics import Metrics
from jobwire.server.stalls import StallWatch
from jobwire.server.store import JobStore
from jobwire.settings import Settings
from jobwire.storage import ResultStore


@dataclass
class Services:
    """What the endpoints use, built once per app in the lifespan."""

    settings: Settings
    redis: Redis
    hub: Fanout
    store: JobStore
    celery: Celery
    auth: Auth
    connections: Connections
    buckets: AsyncBuckets
    results: ResultStore
    metrics: Metrics
    stalls: StallWatch
    # Open websockets and SSE streams, told when the server goes away.
    goodbyes: set[Callable[[], Awaitable[None]]] = field(default_factory=set)
    # One websocket message naming many job ids at a time, process-wide (see
    # `server.routes.ws`): a flood of them from many sockets queues here, not in the loop.
    big_messages: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def going_away(self) -> None:
        """The server is shutting down: close every client, asking it to reconnect. All at
        once: a client that reads nothing holds its goodbye for a grace period."""
        await asyncio.gather(*(goodbye() for goodbye in list(self.goodbyes)), return_exceptions=True)

    def admit(self, user: str | None, address: str) -> Refusal | None:
        """Count one more connection of `user` from `address`, or say why not now (the
        pace of new connections, or too many open), counting the refusal. Nothing is
        counted on a refusal; `connections.release` undoes an admission."""
        refused = self.connections.opening(address) or self.connections.acquire(user, address)
        if refused is not None:
            self.metrics.rejected.labels(refused.reason).inc()
        return refused

    def feed(self, principal: Principal) -> Feed:
        feed = Feed(
            self.hub,
            self.store,
            self.settings.keys,
            principal,
            queue_limit=self.settings.client_queue_limit,
            max_jobs=self.settings.max_jobs_per_socket,
            max_bytes=self.settings.send_buffer_bytes,
        )
        self.stalls.add(feed)
        return feed


def services(conn: HTTPConnection) -> Services:
    """The app's services, from a request or a websocket."""
    return conn.app.state.jobwire  # type: ignore[no-any-return]


def user_key(principal: Principal) -> str | None:
    """Whom per-user limits count: tenant and subject (None without authentication)."""
    if principal is DEVELOPER:
        return None
    return f"{principal.tenant or ''}/{principal.subject}"
