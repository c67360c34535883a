"""REST endpoints: submit, list, poll, batch-poll and revoke jobs; list submittable tasks;
mint single-job link tokens. Each asks `auth` who is calling, and the store answers only
with what that caller may see."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import orjson
from kombu.exceptions import EncodeError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobwire.protocol import MAX_BODY_BYTES, JobNotFound, JobwireError
from jobwire.record import Owner
from jobwire.server import schemas, validation
from jobwire.server.auth import Principal
from jobwire.server.errors import JSON
from jobwire.server.services import Services, services, user_key
from jobwire.tasks.control import Call, revoke_job, submit, submit_group


async def read_json(request: Request) -> Any:
    """The request body as JSON: `application/json` only (a cross-site form or `text/plain`
    POST cannot be one, which closes that CSRF path), with a size cap and clear errors."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise JobwireError(
            "unsupported_media_type",
            f"send JSON with Content-Type: application/json, not {media_type or 'nothing'!r:.60}",
        )
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


def caller(request: Request) -> tuple[Services, Principal]:
    svc = services(request)
    return svc, svc.auth.require(request)


def full_access(principal: Principal, action: str) -> None:
    """Single-job link tokens watch their job; they cannot act."""
    if principal.jobs is not None:
        raise JobwireError("forbidden", f"this token may watch its own job only; it cannot {action}")


def job_links(request: Request, job_id: str) -> dict[str, str]:
    quoted = quote(job_id, safe="")  # any id Celery takes: '/', spaces, '#' ... percent-encoded
    return {
        "self": url_for(request, "job_status", job_id=quoted),
        "events": url_for(request, "job_events", job_id=quoted),
        "ws": url_for(request, "ws_job", job_id=quoted),
    }


def url_for(request: Request, name: str, **params: str) -> str:
    """The absolute URL of one of jobwire's routes. From jobwire's own router, under the
    prefix it is mounted at (`root_path`): Starlette's `request.url_for` asks the outermost
    router, where a host that named its mount would need the name prefixed."""
    path = request.app.router.url_path_for(name, **params)
    secure = request.url.is_secure
    scheme = ("wss" if secure else "ws") if path.protocol == "websocket" else request.url.scheme
    return str(request.url.replace(scheme=scheme, path=request.scope.get("root_path", "") + path, query=""))


async def list_tasks(request: Request) -> Response:
    svc, _ = caller(request)
    tasks = []
    for name in svc.settings.submittable:
        task = svc.celery.tasks.get(name)
        doc = (task.__doc__ or "").strip().splitlines() if task is not None else []
        tasks.append({"name": name, "description": doc[0] if doc else ""})
    return JSON({"tasks": tasks})


async def submit_job(request: Request) -> Response:
    svc, principal = caller(request)
    full_access(principal, "submit jobs")
    req = schemas.parse(schemas.SubmitRequest, await read_json(request))
    for call in req.calls():
        if call.task not in svc.settings.submittable:
            allowed = ", ".join(svc.settings.submittable) or "none"
            raise JobwireError(
                "task_not_allowed", f"task {call.task!r} is not submittable; allowed: {allowed}"
            )
    per_minute = svc.settings.submits_per_minute
    user = user_key(principal) or "developer"
    taken = await svc.buckets.take(f"submit:{user}", rate=per_minute / 60, capacity=per_minute)
    if not taken.allowed:
        retry = max(1, round(taken.retry_after))
        raise RateLimited(f"at most {per_minute} submits a minute; retry in {retry}s", retry)
    job_id = str(uuid.uuid4())
    owner = Owner(principal.tenant, principal.subject) if principal.tenant else None
    try:
        if req.group is None:
            name = req.task or ""
            # The PENDING event (with its owner) is recorded by the publish signal, before
            # the message leaves; submit() removes it again if the message does not leave.
            await run_in_threadpool(submit, svc.celery, name, req.args, req.kwargs, job_id, owner)
        else:
            name = "chord" if req.callback else "group"
            children = [Call(c.task, c.args, c.kwargs, str(uuid.uuid4())) for c in req.group]
            callback = None
            if req.callback is not None:
                cb = req.callback
                callback = Call(cb.task, cb.args, cb.kwargs, str(uuid.uuid4()))
            await run_in_threadpool(submit_group, svc.celery, job_id, children, callback, owner)
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


class RateLimited(JobwireError):
    """429 with a Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__("rate_limited", message)
        self.retry_after = retry_after


async def list_jobs(request: Request) -> Response:
    svc, principal = caller(request)
    params = request.query_params
    limit = validation.bounded_int(params.get("limit", "50"), field="limit", low=1, high=200)
    before = validation.timestamp(params["before"], field="before") if "before" in params else None
    jobs = await svc.store.recent(principal, limit=limit, before=before)
    cursor = jobs[-1]["cursor"] if len(jobs) == limit else None
    for job in jobs:
        del job["cursor"]
    return JSON({"jobs": jobs, "next_before": cursor})


async def job_status(request: Request) -> Response:
    svc, principal = caller(request)
    job_id = path_job_id(request)
    snapshot = await svc.store.require(job_id, principal)
    return JSON(snapshot)


async def job_history(request: Request) -> Response:
    """Events after `?since=N` as JSON: a polling client that must see every transition."""
    svc, principal = caller(request)
    job_id = path_job_id(request)
    since = validation.seq(request.query_params.get("since", "0"), field="since")
    epoch = request.query_params.get("epoch")
    stream = await svc.store.events_since(job_id, since, principal)
    if stream is None:
        raise JobNotFound(job_id)
    reset = stream.seq < since or (epoch is not None and epoch != stream.epoch)
    if reset:  # the history began again: all of it, and say so
        stream = await svc.store.events_since(job_id, 0, principal) or stream
    head = {"job_id": job_id, "epoch": stream.epoch, "reset": reset}
    return Response(
        orjson.dumps(head)[:-1] + b',"events":[' + b",".join(e.raw for e in stream.events) + b"]}",
        media_type="application/json",
    )


async def batch_status(request: Request) -> Response:
    svc, principal = caller(request)
    body = await read_json(request)
    ids = body.get("job_ids") if isinstance(body, dict) else body
    job_ids = validation.job_ids(ids, limit=svc.settings.batch_max_ids)
    return JSON({"jobs": await svc.store.batch_status(job_ids, principal)})


async def revoke(request: Request) -> Response:
    svc, principal = caller(request)
    job_id = path_job_id(request)
    snapshot = await svc.store.require(job_id, principal)
    full_access(principal, "revoke jobs")
    if not snapshot["final"]:
        seq = await run_in_threadpool(revoke_job, svc.celery, job_id)
        if seq is not None:
            return JSON({"job_id": job_id, "status": "REVOKED", "seq": seq}, status_code=202)
        snapshot = await svc.store.snapshot(job_id, principal) or snapshot  # it finished meanwhile
    raise JobwireError("job_finished", f"job {job_id!r} already finished with {snapshot['status']}")


async def job_children(request: Request) -> Response:
    """A group's or chord's children, in submit order, with their status: `?offset&limit`
    (at most JOBWIRE_BATCH_MAX_IDS a page)."""
    svc, principal = caller(request)
    job_id = path_job_id(request)
    await svc.store.require(job_id, principal)
    offset = validation.seq(request.query_params.get("offset", "0"), field="offset")
    limit = validation.seq(request.query_params.get("limit", "100"), field="limit")
    limit = max(1, min(limit, svc.settings.batch_max_ids))
    total, ids = await svc.store.children(job_id, offset, limit)
    statuses = await svc.store.batch_status(ids, principal) if ids else {}
    children = [{"job_id": child, **statuses[child]} for child in ids]
    return JSON({"job_id": job_id, "total": total, "offset": offset, "children": children})


async def link_token(request: Request) -> Response:
    """A short-lived token that may watch this one job: hand it to a browser."""
    svc, principal = caller(request)
    job_id = path_job_id(request)
    await svc.store.require(job_id, principal)
    full_access(principal, "mint tokens")
    token, expires = svc.auth.mint_link(principal, job_id)
    links = {name: f"{url}?token={token}" for name, url in job_links(request, job_id).items()}
    return JSON({"job_id": job_id, "token": token, "expires_at": expires, "links": links}, status_code=201)


# Ids are `{job_id:path}`: an id may hold '/' (sent as %2F, which the server decodes before
# routing). The bare `/api/v1/jobs/{id}` routes are in `id_routes`, which the app puts after
# every other route, so `<id>/history` reaches the history of `<id>`.
routes = [
    Route("/api/v1/tasks", list_tasks, methods=["GET"]),
    Route("/api/v1/jobs", submit_job, methods=["POST"]),
    Route("/api/v1/jobs", list_jobs, methods=["GET"]),
    Route("/api/v1/jobs/batch-status", batch_status, methods=["POST"]),
    Route("/api/v1/jobs/{job_id:path}/history", job_history, methods=["GET"]),
    Route("/api/v1/jobs/{job_id:path}/children", job_children, methods=["GET"]),
    Route("/api/v1/jobs/{job_id:path}/token", link_token, methods=["POST"]),
]
id_routes = [
    Route("/api/v1/jobs/{job_id:path}", job_status, methods=["GET"], name="job_status"),
    Route("/api/v1/jobs/{job_id:path}", revoke, methods=["DELETE"]),
]
