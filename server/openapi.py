"""`GET /openapi.json`: the REST API described for clients and fuzzers.

Written out here, next to the models it reuses (`schemas`), and checked against the app's
routes by a test, so a route cannot be added without its description.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobwire import __version__
from jobwire.protocol import ERROR_STATUS, MAX_JOB_ID_CHARS
from jobwire.server.errors import JSON
from jobwire.server.schemas import (
    BatchStatusRequest,
    CeleryLimitRequest,
    LimitRequest,
    ScaleRequest,
    SubmitRequest,
    TaskCall,
)

_REF = "#/components/schemas/{model}"


def _without_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's schema whose nested models are components of their own (see `_REF`)."""
    schema.pop("$defs", None)
    return schema


def _path_param(name: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", **schema}}


_JOB_ID = _path_param("job_id", maxLength=MAX_JOB_ID_CHARS)
_SINCE = {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str, ok: int, ok_desc: str, *errors: int, params: list[Any] | None = None, body: Any = None
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(ok): _json({"type": "object"}, ok_desc) if ok != 204 else {"description": ok_desc}
    }
    for status in sorted({401, 422, *errors}):
        responses[str(status)] = {"$ref": "#/components/responses/Error"}
    op: dict[str, Any] = {"summary": summary, "responses": responses, "security": [{"bearer": []}]}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}},
        }
    return op


PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/tasks": {"get": _op("Tasks that may be submitted", 200, "{tasks: [{name, description}]}")},
    "/api/v1/jobs": {
        "post": _op(
            "Submit an allow-listed task, or a group or chord of them (one job)",
            202,
            "{job_id, status, task, links}",
            413,
            415,
            429,
            503,
            body=SubmitRequest,
        ),
        "get": _op(
            "Recent jobs the caller may see, newest first",
            200,
            "{jobs, next_before}",
            403,
            params=[
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                {"name": "before", "in": "query", "schema": {"type": "number", "minimum": 0}},
            ],
        ),
    },
    "/api/v1/jobs/batch-status": {
        "post": _op(
            "Status of many jobs in one Redis command",
            200,
            "{jobs: {id: {status, ready, seq}}}",
            413,
            415,
            body=BatchStatusRequest,
        )
    },
    "/api/v1/jobs/{job_id}": {
        "get": _op("One job's current state", 200, "the job's snapshot", 404, params=[_JOB_ID]),
        "delete": _op("Revoke a job", 202, "{job_id, status: REVOKED, seq}", 403, 404, 409, params=[_JOB_ID]),
    },
    "/api/v1/jobs/{job_id}/history": {
        "get": _op("Events after `since`", 200, "{job_id, events}", 404, params=[_JOB_ID, _SINCE])
    },
    "/api/v1/jobs/{job_id}/children": {
        "get": _op(
            "A group's or chord's children, in submit order, with their status",
            200,
            "{job_id, total, offset, children: [{job_id, status, ready, seq, epoch}]}",
            404,
            params=[
                _JOB_ID,
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
            ],
        )
    },
    "/api/v1/jobs/{job_id}/result": {
        "get": _op(
            "The job's result: JSON, a stored file (HTTP Range), or a redirect to a presigned URL",
            200,
            "the result",
            404,
            409,
            410,
            params=[_JOB_ID, {"name": "Range", "in": "header", "schema": {"type": "string"}}],
        )
    },
    "/api/v1/jobs/{job_id}/token": {
        "post": _op(
            "A short-lived token that may watch this job only",
            201,
            "{job_id, token, expires_at, links}",
            403,
            404,
            params=[_JOB_ID],
        )
    },
    "/api/v1/jobs/{job_id}/events": {
        "get": _op(
            "Server-Sent Events of one job (resumes from Last-Event-ID)",
            200,
            "text/event-stream",
            404,
            429,
            503,
            params=[_JOB_ID, _SINCE, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
        )
    },
    "/api/v1/events": {
        "get": _op(
            "Server-Sent Events of many jobs",
            200,
            "text/event-stream",
            403,
            413,
            429,
            503,
            params=[
                {
                    "name": "job",
                    "in": "query",
                    "schema": {"type": "array", "items": {"type": "string"}},
                    "explode": True,
                },
                {
                    "name": "since",
                    "in": "query",
                    "schema": {"type": "array", "items": {"type": "string", "pattern": "^.+:[0-9]+$"}},
                    "explode": True,
                },
                {"name": "all", "in": "query", "schema": {"type": "string", "enum": ["1", "true"]}},
            ],
        )
    },
    "/api/v1/admin/rate-limits": {
        "get": _op("Task rate limits, with the jobs waiting on each (admin)", 200, "{limits}", 403)
    },
    "/api/v1/admin/rate-limits/celery": {
        "get": _op("Celery's per-node task limits: declared and wanted (admin)", 200, "{tasks}", 403),
        "post": _op(
            "Scale every declared limit by a factor, or restore them (admin)",
            200,
            "{scaled} or {restored}",
            403,
            415,
            body=ScaleRequest,
        ),
    },
    "/api/v1/admin/rate-limits/celery/{task}": {
        "put": _op(
            "Set a Celery task's limit on all or chosen workers (admin)",
            200,
            "{task, rate, workers}",
            403,
            415,
            params=[_path_param("task")],
            body=CeleryLimitRequest,
        )
    },
    "/api/v1/admin/rate-limits/{name}": {
        "put": _op(
            "Set a task rate limit for every worker (admin)",
            200,
            "{name, rate, burst}",
            403,
            415,
            params=[_path_param("name")],
            body=LimitRequest,
        )
    },
    # celery-progress's view, for pages built on its JS (a websocket at the same path too);
    # the trailing slash is optional.
    **dict.fromkeys(
        ("/celery-progress/{task_id}/", "/celery-progress/{task_id}"),
        {
            "get": _op(
                "One job in celery-progress's JSON: {state, complete, success, progress, result}",
                200,
                "{state, complete, success, progress, result?}; PENDING for an unknown id",
                503,
                params=[_path_param("task_id", maxLength=MAX_JOB_ID_CHARS)],
            )
        },
    ),
    "/healthz": {
        "get": {"summary": "The process answers", "responses": {"200": {"description": "ok"}}, "security": []}
    },
    "/readyz": {
        "get": {
            "summary": "Redis answers and the hub is subscribed",
            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
            "security": [],
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics: connections, deliveries, events, hub reconnects, Redis latency "
            "(admin; or on JOBWIRE_METRICS_ADDR's listener instead, and not here)",
            "responses": {
                "200": {"description": "text/plain; version=0.0.4"},
                "401": {"$ref": "#/components/responses/Error"},
                "403": {"$ref": "#/components/responses/Error"},
            },
            "security": [{"bearer": []}],
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1"}},
            "security": [],
        }
    },
}


def document() -> dict[str, Any]:
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": sorted(ERROR_STATUS)},
                    "message": {"type": "string"},
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jobwire",
            "version": __version__,
            "description": (
                "Live progress of Celery jobs. "
                "The websockets (/ws, /ws/jobs/{job_id}) are described in the README."
            ),
        },
        "paths": PATHS,
        "components": {
            "schemas": {
                "Error": error,
                "SubmitRequest": _without_defs(SubmitRequest.model_json_schema(ref_template=_REF)),
                "TaskCall": TaskCall.model_json_schema(),
                "BatchStatusRequest": BatchStatusRequest.model_json_schema(),
                "LimitRequest": LimitRequest.model_json_schema(),
                "CeleryLimitRequest": CeleryLimitRequest.model_json_schema(),
                "ScaleRequest": ScaleRequest.model_json_schema(),
            },
            "responses": {
                "Error": _json(
                    {"$ref": "#/components/schemas/Error"}, 'an error: {"error": {"code", "message"}}'
                )
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


_DOCUMENT = document()


async def openapi(request: Request) -> Response:
    # Mounted under a prefix (`jobwire.mount()`), the paths are relative to it: say where.
    root = request.scope.get("root_path", "")
    return JSON({**_DOCUMENT, "servers": [{"url": root}]} if root else _DOCUMENT)


routes = [Route("/openapi.json", openapi, methods=["GET"])]
