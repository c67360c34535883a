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
from jobwire.tasks.throttle import define_limit, limits

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def admin(request: Request) -> Services:
    svc = services(request)
    principal = svc.auth.require(request)
    if not principal.admin or principal.jobs is not None:
        raise JobwireError("forbidden", "this needs the admin scope")
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


routes = [
    Route("/api/v1/admin/rate-limits", list_limits, methods=["GET"]),
    Route("/api/v1/admin/rate-limits/{name}", set_limit, methods=["PUT"]),
]
