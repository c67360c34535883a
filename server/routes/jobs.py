"""REST endpoints: submit, list, poll, batch-poll and revoke jobs; list submittable tasks."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from jobwire.server import schemas, validation
from jobwire.server.errors import JSON
from jobwire.server.services import services
from jobwire.tasks.control import revoke_job, submit
from kombu.exceptions import EncodeError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobwire.protocol import MAX_BODY_BYTES, JobNotFound, JobwireError


async def read_json(request: Request) -> Any:
    """The request body as JSON, with a size cap and clear errors."""
    too_large = JobwireError("payload_too_large", f"request body over {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise JobwireError("invalid_json", f"request body is not valid JSON: {exc}") from None


def path_job_id(request: Request) -> str:
    """The `{job_id}` path parameter, checked (422 `invalid_job_id` if malformed)."""
    return validation.job_id(request.path_params["job_id"])


def job_links(request: Request, job_id: str) -> dict[str, str]:
    return {
        "self": str(request.url_for("job_status", job_id=job_id)),
        "events": str(request.url_for("job_events", job_id=job_id)),
        "ws": str(request.url_for("ws_job", job_id=job_id)),
    }


async def list_tasks(request: Request) -> Response:
    svc = services(request)
    tasks = []
    for name in svc.settings.submittable:
        task = svc.celery.tasks.get(name)
        doc = (task.__doc__ or "").strip().splitlines() if task is not None else []
        tasks.append({"name": name, "description": doc[0] if doc else ""})
    return JSON({"tasks": tasks})


async def submit_job(request: Request) -> Response:
    svc = services(request)
    req = schemas.parse(schemas.SubmitRequest, await read_json(request))
    name, args, kwargs = req.task, req.args, req.kwargs
    if name not in svc.settings.submittable:
        allowed = ", ".join(svc.settings.submittable) or "none"
        raise JobwireError("task_not_allowed", f"task {name!r} is not submittable; allowed: {allowed}")
    job_id = str(uuid.uuid4())
    try:
        # The PENDING event is recorded by the publish signal, before the message leaves;
        # submit() removes it again if the message does not leave.
        await run_in_threadpool(submit, svc.celery, name, args, kwargs, job_id)
    except OperationalError as exc:
        raise JobwireError("broker_unavailable", f"could not queue the job: {exc}") from None
    except (EncodeError, TypeError, ValueError) as exc:
        raise JobwireError("invalid_request", f"the task's arguments cannot be sent: {exc}") from None
    links = job_links(request, job_id)
    return JSON(
        {"job_id": job_id, "status": "PENDING", "task": name, "links": links},
        status_code=202,
        headers={"Location": links["self"]},
    )


async def list_jobs(request: Request) -> Response:
    svc = services(request)
    params = request.query_params
    limit = validation.bounded_int(params.get("limit", "50"), field="limit", low=1, high=200)
    before = validation.timestamp(params["before"], field="before") if "before" in params else None
    jobs = await svc.store.recent(limit=limit, before=before)
    cursor = jobs[-1]["cursor"] if len(jobs) == limit else None
    for job in jobs:
        del job["cursor"]
    return JSON({"jobs": jobs, "next_before": cursor})


async def job_status(request: Request) -> Response:
    job_id = path_job_id(request)
    snapshot = await services(request).store.snapshot(job_id)
    if snapshot is None:
        raise JobNotFound(job_id)
    return JSON(snapshot)


async def job_history(request: Request) -> Response:
    """Events after `?since=N` as JSON: a polling client that must see every transition."""
    svc = services(request)
    job_id = path_job_id(request)
    since = validation.seq(request.query_params.get("since", "0"), field="since")
    exists, events = await svc.store.events_since(job_id, since)
    if not exists:
        raise JobNotFound(job_id)
    return Response(
        b'{"job_id":' + orjson.dumps(job_id) + b',"events":[' + b",".join(e.raw for e in events) + b"]}",
        media_type="application/json",
    )


async def batch_status(request: Request) -> Response:
    svc = services(request)
    body = await read_json(request)
    ids = body.get("job_ids") if isinstance(body, dict) else body
    job_ids = validation.job_ids(ids, limit=svc.settings.batch_max_ids)
    return JSON({"jobs": await svc.store.batch_status(job_ids)})


async def revoke(request: Request) -> Response:
    svc = services(request)
    job_id = path_job_id(request)
    snapshot = await svc.store.snapshot(job_id)
    if snapshot is None:
        raise JobNotFound(job_id)
    if not snapshot["final"]:
        seq = await run_in_threadpool(revoke_job, svc.celery, job_id)
        if seq is not None:
            return JSON({"job_id": job_id, "status": "REVOKED", "seq": seq}, status_code=202)
        snapshot = await svc.store.snapshot(job_id) or snapshot  # it finished meanwhile
    raise JobwireError("job_finished", f"job {job_id!r} already finished with {snapshot['status']}")


routes = [
    Route("/api/v1/tasks", list_tasks, methods=["GET"]),
    Route("/api/v1/jobs", submit_job, methods=["POST"]),
    Route("/api/v1/jobs", list_jobs, methods=["GET"]),
    Route("/api/v1/jobs/batch-status", batch_status, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}", job_status, methods=["GET"], name="job_status"),
    Route("/api/v1/jobs/{job_id}", revoke, methods=["DELETE"]),
    Route("/api/v1/jobs/{job_id}/history", job_history, methods=["GET"]),
]
