"""One error shape for every HTTP failure: `{"error": {"code", "message"}}` with a status.

Route code raises `JobwireError` (the contract's one error type, which carries its HTTP
status); Starlette's own errors (404 route, 405 method) and Redis outages are translated by
the handlers here, so no client ever sees an HTML error page or a bare 500 for a
foreseeable failure.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jobwire.protocol import JobwireError
from jobwire.redis_clients import is_transient

log = logging.getLogger(__name__)


class JSON(JSONResponse):
    """JSONResponse rendered with orjson (faster, and encodes floats exactly)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


def error_response(status: int, code: str, message: str) -> Response:
    return JSON({"error": {"code": code, "message": message}}, status_code=status)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


async def _jobwire_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, JobwireError)
    response = error_response(exc.status, exc.code, exc.message)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(math.ceil(exc.retry_after))  # whole seconds
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if exc.status_code != 404 else f"no route for {request.url.path}"
    response = error_response(exc.status_code, code, str(message))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def redis_unreachable(exc: BaseException) -> bool:
    """Only a lost or slow connection, or a failover under way, means "unavailable, retry"
    (see `is_transient`); any other Redis error (a wrong-type key, a script error) is a
    fault on our side, and is not called an outage."""
    return is_transient(exc)


#: Seconds a client is asked to wait after a 503 for Redis: a failover takes a few.
RETRY_AFTER = 2


def redis_unavailable() -> Response:
    response = error_response(503, "redis_unavailable", "the job store (Redis) is unreachable; retry")
    response.headers["Retry-After"] = str(RETRY_AFTER)
    return response


async def _redis_error(request: Request, exc: Exception) -> Response:
    if redis_unreachable(exc):
        log.warning("Redis unavailable for %s %s: %s", request.method, request.url.path, exc)
        return redis_unavailable()
    log.error("Redis error for %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        500, "internal_error", "the job store answered with an error; this is a server fault"
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    if redis_unreachable(exc):  # a cluster error outside RedisError, or redis-py's own race
        log.warning("Redis unavailable for %s %s: %r", request.method, request.url.path, exc)
        return redis_unavailable()
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "unexpected server error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    JobwireError: _jobwire_error,
    HTTPException: _http_error,
    RedisError: _redis_error,
    Exception: _unexpected,
}
