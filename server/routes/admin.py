"""Admin endpoints (the `admin` scope): task rate limits, listed and set at run time.

`GET /api/v1/admin/rate-limits`: every defined limit, with how many jobs wait on it.
`PUT /api/v1/admin/rate-limits/{name}` `{"rate": "100/m", "burst"?: n}`: set it, for every
worker at once (they read it from Redis at each take).
"""

from __future__ import annotations

import re

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobwire.protocol import JobwireError
from jobwire.server import schemas
from jobwire.server.errors import JSON
from jobwire.server.routes.jobs import read_json
from jobwire.server.services import Services, services
from jobwire.tasks.celery_limits import CeleryRateLimits
from jobwire.tasks.throttle import define_limit, limits

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def admin(request: Request) -> Services:
    svc = services(request)
    svc.auth.require_admin(request)
    return svc


async def list_limits(request: Request) -> Response:
    svc = admin(request)
    return JSON({"limits": await run_in_threadpool(limits, svc.celery)})


async def set_limit(request: Request) -> Response:
    svc = admin(request)
    name = request.path_params["name"]
    if not _NAME.match(name):
        raise JobwireError(
            "invalid_request", f"a limit name is 1-100 letters, digits or _.:-, got {name!r:.60}"
        )
    req = schemas.parse(schemas.LimitRequest, await read_json(request))
    return JSON(await run_in_threadpool(define_limit, svc.celery, name, req.rate, burst=req.burst))


async def list_celery_limits(request: Request) -> Response:
    svc = admin(request)
    return JSON({"tasks": await run_in_threadpool(CeleryRateLimits(svc.celery).listing)})


async def set_celery_limit(request: Request) -> Response:
    """`{"rate": "10/m", "workers"?: [hostname, ...]}` for one task."""
    svc = admin(request)
    req = schemas.parse(schemas.CeleryLimitRequest, await read_json(request))
    manager = CeleryRateLimits(svc.celery)
    rate = await run_in_threadpool(
        manager.set, request.path_params["task"], req.rate, destination=req.workers
    )
    return JSON({"task": request.path_params["task"], "rate": rate, "workers": req.workers or "all"})


async def scale_celery_limits(request: Request) -> Response:
    """`{"factor": 0.5}` scales every declared limit; `{"restore": true}` restores them."""
    svc = admin(request)
    req = schemas.parse(schemas.ScaleRequest, await read_json(request))
    manager = CeleryRateLimits(svc.celery)
    if req.restore:
        return JSON({"restored": await run_in_threadpool(manager.restore)})
    if req.factor is None:
        raise JobwireError("invalid_request", "give a factor (> 0), or restore: true")
    return JSON({"scaled": await run_in_threadpool(manager.scale, req.factor)})


routes = [
    Route("/api/v1/admin/rate-limits/celery", list_celery_limits, methods=["GET"]),
    Route("/api/v1/admin/rate-limits/celery", scale_celery_limits, methods=["POST"]),
    Route("/api/v1/admin/rate-limits/celery/{task}", set_celery_limit, methods=["PUT"]),
    Route("/api/v1/admin/rate-limits", list_limits, methods=["GET"]),
    Route("/api/v1/admin/rate-limits/{name}", set_limit, methods=["PUT"]),
]
