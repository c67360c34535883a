"""Server-Sent Events for one job: for clients that cannot hold a websocket.

`id:` is the event's seq, so a browser's EventSource resumes by itself after a drop
(it sends `Last-Event-ID`); `?since=N` does the same for clients that cannot set headers.
The stream ends after the job's final event, and a reconnect after that gets `204 No
Content`, which tells EventSource to stop reconnecting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from server import validation
from server.errors import ApiError
from server.events import Delivery
from server.feed import Feed
from server.hub import HubUnavailable
from server.routes.jobs import _path_job_id
from server.services import services

RETRY_MS = 2000  # how soon EventSource reconnects after a drop


async def job_events(request: Request) -> Response:
    svc = services(request)
    job_id = _path_job_id(request)
    raw_since = request.headers.get("last-event-id") or request.query_params.get("since") or "0"
    try:
        since = validation.seq(raw_since, field="Last-Event-ID/since")
    except validation.ValidationError as exc:
        raise ApiError(422, exc.code, str(exc)) from None

    snapshot = await svc.store.snapshot(job_id)
    if snapshot is None:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r} (never submitted, or expired)")
    if snapshot["final"] and since >= snapshot["seq"]:
        return Response(status_code=204)

    feed = svc.feed()
    try:
        await feed.watch(job_id, since)
    except HubUnavailable as exc:
        feed.close()
        raise ApiError(503, "unavailable", str(exc)) from None
    return StreamingResponse(
        _stream(feed, svc.settings.heartbeat_interval),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(feed: Feed, heartbeat: float) -> AsyncIterator[str]:
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            item = await feed.next(idle=heartbeat)
            if item is None:
                yield ": keepalive\n\n"
            elif isinstance(item, Delivery):
                yield f"id: {item.seq}\ndata: {item.raw.decode()}\n\n"
                if item.final:
                    return
    finally:
        feed.close()


routes = [Route("/api/v1/jobs/{job_id}/events", job_events, methods=["GET"], name="job_events")]
