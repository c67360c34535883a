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
from jobwire.server.refusals import RefusalLog
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
    # Every refused websocket and SSE stream is said here (see `server.refusals`).
    refusals: RefusalLog = field(default_factory=RefusalLog)

    async def going_away(self) -> None:
        """The server is shutting down: close every client, asking it to reconnect. All at
        once: a client that reads nothing holds its goodbye for a grace period."""
        await asyncio.gather(*(goodbye() for goodbye in list(self.goodbyes)), return_exceptions=True)

    def admission(self, kind: str, address: str) -> Admission:
        """A new connection's place in the limits (see `Admission`)."""
        return Admission(self, kind, address)

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


class Admission:
    """One connection's place in the limits, for every transport alike: its address is
    admitted first (the pace of new connections, and how many are open), its user once
    known (a websocket learns it after the upgrade), and everything is released once,
    whatever ends the connection. A refusal for load is counted in the metrics, and
    nothing is held for it; every refusal, for load or not, is said in the log (`refuse`)."""

    def __init__(self, svc: Services, kind: str, address: str) -> None:
        self._svc, self._kind, self._address = svc, kind, address
        self._user: str | None = None
        self._address_held = self._user_held = False
        self._uncount: Callable[[], None] | None = None
        self._goodbye: Callable[[], Awaitable[None]] | None = None

    def admit(self, user: str | None = None, *, complete: bool = True) -> Refusal | None:
        """Admit the address (and `user`, when known); None if admitted, else why not now."""
        connections = self._svc.connections
        refused = connections.opening(self._address) or connections.acquire(user, self._address)
        if refused is not None:
            return self._refused(refused)
        self._address_held, self._user, self._user_held = True, user, user is not None
        if complete:
            self._opened()
        return None

    def admit_user(self, user: str | None) -> Refusal | None:
        """Admit the user of a connection whose address is admitted already."""
        refused = self._svc.connections.acquire_user(user)
        if refused is not None:
            return self._refused(refused)
        self._user, self._user_held = user, user is not None
        self._opened()
        return None

    def on_goodbye(self, goodbye: Callable[[], Awaitable[None]]) -> None:
        """Tell this connection `goodbye()` when the server goes away (until released)."""
        self._goodbye = goodbye
        self._svc.goodbyes.add(goodbye)

    def release(self) -> None:
        """Give back everything held; a second call does nothing."""
        if self._uncount is not None:
            self._uncount()
            self._uncount = None
        if self._goodbye is not None:
            self._svc.goodbyes.discard(self._goodbye)
            self._goodbye = None
        if self._address_held:
            self._svc.connections.release(self._user if self._user_held else None, self._address)
            self._address_held = self._user_held = False

    def refuse(self, reason: str, detail: str) -> None:
        """This connection is refused for `reason` (a `Disconnect` label), before or instead
        of being admitted: said in the log, once, with the address."""
        self._svc.refusals(self._kind, reason, detail, self._address)

    def _opened(self) -> None:
        self._uncount = self._svc.metrics.connection(self._kind)

    def _refused(self, refused: Refusal) -> Refusal:
        self._svc.metrics.rejected.labels(refused.reason).inc()
        self.refuse("load", refused.message)
        return refused


def services(conn: HTTPConnection) -> Services:
    """The app's services, from a request or a websocket."""
    return conn.app.state.jobwire  # type: ignore[no-any-return]


def user_key(principal: Principal) -> str | None:
    """Whom per-user limits count: tenant and subject (None without authentication)."""
    if principal is DEVELOPER:
        return None
    return f"{principal.tenant or ''}/{principal.subject}"
