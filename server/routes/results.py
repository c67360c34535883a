"""`GET /api/v1/jobs/{job_id}/result`: a job's result, wherever it is kept.

A result stored in object storage is streamed from the filesystem store (HTTP Range,
Content-Type, Content-Length and Content-Disposition by Starlette's FileResponse) or
redirected to a short-lived presigned URL (S3). An inline result is answered as JSON. The
same ownership rules as every read: another tenant's job is not found.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from jobwire.protocol import SUCCESS, JobwireError
from jobwire.server.errors import JSON
from jobwire.server.routes.jobs import caller, path_job_id
from jobwire.storage import is_reference


async def job_result(request: Request) -> Response:
    svc, principal = caller(request)
    job_id = path_job_id(request)
    snapshot = await svc.store.require(job_id, principal)
    if snapshot["status"] != SUCCESS:
        raise JobwireError("no_result", f"job {job_id!r} has no result: it is {snapshot['status']}")
    result = snapshot.get("result")
    if not is_reference(result):
        return JSON({"job_id": job_id, "result": result})
    store = svc.results
    if result["storage"] != store.name:
        raise JobwireError(
            "unavailable", f"the result is in {result['storage']!r} storage; this server uses {store.name!r}"
        )
    filename, content_type = str(result.get("filename") or "result"), str(result.get("content_type"))
    path = store.path(result["key"])
    if path is not None:
        return FileResponse(
            path, media_type=content_type, filename=filename, content_disposition_type="attachment"
        )
    url = store.url(
        result["key"], filename=filename, content_type=content_type, expires=svc.settings.result_url_ttl
    )
    if url is None:
        raise JobwireError("result_gone", f"the stored result of job {job_id!r} no longer exists (expired)")
    return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})


routes = [Route("/api/v1/jobs/{job_id:path}/result", job_result, methods=["GET"], name="job_result")]
