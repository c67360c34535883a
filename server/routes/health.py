"""Liveness (the process answers) and readiness (Redis answers, the hub is subscribed).

Readiness has three answers, for load balancers: "ready" (200), "degraded" (200: some
shards of a Redis Cluster are failing over, and the jobs on the others flow: every server
process sees the same cluster, so taking this one out of rotation would help no one), and
"unavailable" (503: no Redis at all, so no event can flow from this process).
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobwire.server.errors import JSON, RETRY_AFTER, redis_unreachable
from jobwire.server.services import Services, services

log = logging.getLogger(__name__)


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    hub = svc.hub.health
    redis_ok = await _redis_answers(svc) if svc.settings.redis_target.mode != "cluster" else hub != "down"
    if not redis_ok or hub == "down":
        status = "unavailable"
    else:
        status = "ready" if hub == "ok" else "degraded"
    body = {"status": status, "redis": redis_ok, "hub": hub}
    response = JSON(body, status_code=503 if status == "unavailable" else 200)
    if status == "unavailable":
        response.headers["Retry-After"] = str(RETRY_AFTER)
    return response


async def _redis_answers(svc: Services) -> bool:
    """A PING through the read client. (On a cluster the hub's connections ping every
    primary already, and a PING there would go to all of them: one dead shard would make
    the whole server look down.)"""
    try:
        return bool(await asyncio.wait_for(svc.redis.ping(), timeout=1.0))
    except Exception as exc:  # whatever stops a PING (a refused login too) means not ready
        if not (isinstance(exc, (TimeoutError, RedisError)) or redis_unreachable(exc)):
            log.warning("jobwire: readiness PING failed: %r", exc)
        return False


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
