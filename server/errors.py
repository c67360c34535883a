"""One error shape for every HTTP failure: `{"error": {"code", "message"}}` with a status.

Route code raises `ApiError`; Starlette's own errors (404 route, 405 method) and Redis
outages are translated by the handlers here, so no client ever sees an HTML error page
or a bare 500 for a foreseeable failure.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.validation import ValidationError

log = logging.getLogger(__name__)


class JSON(JSONResponse):
    """JSONResponse rendered with orjson (faster, and encodes floats exactly)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


class ApiError(Exception):
    """An expected failure with an HTTP status, a stable machine code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job with id {job_id!r} (never submitted, or expired)")


def error_response(status: int, code: str, message: str) -> Response:
    return JSON({"error": {"code": code, "message": message}}, status_code=status)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message)


async def _invalid_input(request: Request, exc: Exception) -> Response:
    """Any request input that failed a `server.validation` check: 413 for too many ids,
    422 otherwise, with the check's own code and message."""
    assert isinstance(exc, ValidationError)
    return error_response(413 if exc.code == "too_many_ids" else 422, exc.code, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if exc.status_code != 404 else f"no route for {request.url.path}"
    response = error_response(exc.status_code, code, str(message))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _redis_error(request: Request, exc: Exception) -> Response:
    log.warning("Redis unavailable for %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "redis_unavailable", "the job store (Redis) is unreachable; retry")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "unexpected server error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    ValidationError: _invalid_input,
    HTTPException: _http_error,
    RedisError: _redis_error,
    Exception: _unexpected,
}
