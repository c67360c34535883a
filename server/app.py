"""The Starlette app factory: `jobwire serve`, or `uvicorn --factory jobwire.server.app:create_app`."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from jobwire.ratelimit import AsyncBuckets
from jobwire.redis_clients import async_client, primary_url
from jobwire.server import metrics as metrics_routes
from jobwire.server import openapi
from jobwire.server.auth import Auth, RedactTokens
from jobwire.server.bridge import Bridge
from jobwire.server.celery_app import load_celery_app
from jobwire.server.cluster_hub import ClusterHub
from jobwire.server.direct import RawSend
from jobwire.server.errors import EXCEPTION_HANDLERS
from jobwire.server.heads import HeadLimit
from jobwire.server.hub import Fanout, Hub
from jobwire.server.lifecycle import Lifecycle, StartOnFirstUse
from jobwire.server.limits import Connections
from jobwire.server.metrics import Metrics
from jobwire.server.routes import admin, celery_progress, health, jobs, results, sse, ws
from jobwire.server.services import Services
from jobwire.server.stalls import StallWatch
from jobwire.server.store import JobStore
from jobwire.settings import Settings
from jobwire.storage import store_for
from jobwire.tasks import registry

# `static/` (the dashboard) and `js/` (the npm package `jobwire`: the client and the progress
# element, served as they are published) sit beside `server/` in the repository and beside
# `jobwire/server/` once installed (package data), so one path serves both.
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CLIENT_DIR = Path(__file__).resolve().parent.parent / "js"
_REDACT = RedactTokens()  # one instance: addFilter() ignores a filter it already has


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    # Imported now, not in the lifespan: a wrong JOBWIRE_CELERY_APP fails at start, loudly.
    celery = load_celery_app(settings)
    # Read events where the app's workers write them (attach() may have taken the Redis
    # from the app's result backend).
    recorded = registry.settings_for(celery)
    settings = settings.model_copy(
        update={
            "redis_url": recorded.redis_url,
            "redis_sentinel_master": recorded.redis_sentinel_master,
            "key_prefix": recorded.key_prefix,
        }
    )
    target = settings.redis_target
    auth = Auth(settings)  # here: a key file that cannot be read fails at start
    # HTTP requests are logged to uvicorn.access, websocket upgrades (with their query
    # string: `/ws?token=…`, the celery-progress socket's only way) to uvicorn.error.
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(_REDACT)

    @asynccontextmanager
    async def run() -> AsyncIterator[Services]:
        """Build the services, and tear them down (see `server.lifecycle`: when)."""
        redis = async_client(
            target,
            max_connections=settings.redis_max_connections,
            wait=settings.subscribe_timeout,
            socket_timeout=5,
        )
        metrics = Metrics()
        hub = _hub(settings, metrics)
        await hub.start()
        stalls = StallWatch(settings.stall_timeout)
        await stalls.start()
        store = JobStore(redis, settings.keys)
        bridge = Bridge(redis, settings) if settings.celery_backends else None
        if bridge is not None:
            store.seed = bridge.seed
            await bridge.start()
        app.state.jobwire = svc = Services(
            settings,
            redis,
            hub,
            store,
            celery,
            auth,
            Connections(
                settings.max_connections_per_user,
                settings.max_connections_per_address,
                settings.new_connections_per_second,
            ),
            AsyncBuckets(redis, settings.keys),
            store_for(settings),
            metrics,
            stalls,
        )
        try:
            if settings.metrics_listen is None:
                yield svc
            else:
                async with metrics_routes.listener(svc, *settings.metrics_listen):
                    yield svc
        finally:
            svc.refusals.close()  # its pending counts said now, no timer left to say them later
            if bridge is not None:
                await bridge.stop()
            await stalls.stop()
            await hub.stop()
            await redis.aclose()

    routes: list[Any] = [
        *health.routes,
        *jobs.routes,
        *results.routes,
        *sse.routes,
        *ws.routes,
        *celery_progress.routes,
        *admin.routes,
        *openapi.routes,
        # On its own listener when JOBWIRE_METRICS_ADDR names one (then not here at all).
        *(metrics_routes.routes if settings.metrics_listen is None else []),
        *jobs.id_routes,  # last: see server.routes.jobs
    ]
    if STATIC_DIR.is_dir():
        routes.append(Mount("/", app=Static(directory=STATIC_DIR, html=True), name="static"))
    lifecycle = Lifecycle(run, settings)
    middleware = [
        Middleware(RawSend),  # first: it must see the server's own send (see server.direct)
        Middleware(StartOnFirstUse, lifecycle=lifecycle),  # mounted where no lifespan runs
        Middleware(HeadLimit, max_url=settings.max_url_bytes, max_headers=settings.max_header_bytes),
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["authorization", "content-type", "last-event-id"],
            max_age=600,
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifecycle.lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=middleware,
    )
    app.state.lifecycle = lifecycle  # for a host that starts and stops it (`server.mount`)
    return app


def _hub(settings: Settings, metrics: Metrics) -> Fanout:
    """The fan-out for the target: a hub per shard on a cluster, or one hub, which asks
    Sentinel where the primary is before every connection."""
    target = settings.redis_target
    keys = settings.keys
    options: dict[str, Any] = dict(
        subscribe_timeout=settings.subscribe_timeout,
        on_event=metrics.event,
        unordered=lambda channel: keys.job_id_from_channel(channel) is None,  # the all-jobs streams
    )
    if target.mode == "cluster":
        return ClusterHub(target, settings.keys, **options)
    if target.mode == "sentinel":
        return Hub(functools.partial(primary_url, target), **options)
    return Hub(target.url, **options)


class Static(StaticFiles):
    """The static files, mounted at `/`, where every path no route took ends up: the
    dashboard, and the npm package's scripts (`/jobwire.js`, `/jobwire-progress.js`: one
    copy, the package's; nothing else of its folder). A websocket there is refused
    (Starlette before 1.7 asserted HTTP and answered 500)."""

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        found = super().lookup_path(path)
        if found[1] is not None or "/" in path or not path.endswith(".js") or not CLIENT_DIR.is_dir():
            return found
        script = CLIENT_DIR / path
        return (str(script), script.stat()) if script.is_file() else found

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "no websocket at this path"})
            return
        await super().__call__(scope, receive, send)
