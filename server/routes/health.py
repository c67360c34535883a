"""Liveness (the process answers) and readiness (Redis answers, the hub is subscribed)."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobwire.server.errors import JSON
from jobwire.server.services import services


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    try:
        redis_ok = bool(await asyncio.wait_for(svc.redis.ping(), timeout=1.0))
    except (RedisError, OSError, TimeoutError):
        redis_ok = False
    ready = redis_ok and svc.hub.connected
    body = {
        "status": "ready" if ready else "unavailable",
        "redis": redis_ok,
        "hub": svc.hub.connected,
    }
    return JSON(body, status_code=200 if ready else 503)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
