"""Server-Sent Events: for clients that cannot hold a websocket.

`GET /api/v1/jobs/{job_id}/events` — one job. `id:` is the event's seq, so a browser's
EventSource resumes by itself after a drop (it sends `Last-Event-ID`); `?since=N` does the
same for clients that cannot set headers. The stream ends after the job's final event,
and a reconnect after that gets `204 No Content`, which tells EventSource to stop.

`GET /api/v1/events?job=<id>&job=<id>&since=<id>:<seq>&all=1` — many jobs on one stream,
what the browser client falls back to (browsers allow only six HTTP/1.1 connections per
host, so one EventSource per job would starve a dashboard). Events carry no `id:`: with
many jobs one id cannot say where each stopped, so the client tracks the seq per job and
reconnects with `since`. With `all=1`, other jobs' live events come as `event: all` (not
part of any job's ordered stream); control messages (`subscribed`, `error`, `resync`) as
`event: control`. Once nothing more can come (every job ended, or none exists, and no
`all=1`), the stream says `{"type": "end"}` and closes, rather than idle on keepalives.

Both end when their token expires, as a websocket closes 4401 then: one `event: control`
with `{"type": "error", "code": "unauthenticated", "message": "token expired"}`, and no
`end`, so the client reconnects with a new token and resumes (`Last-Event-ID`, `since`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope

from jobwire.protocol import MAX_JOBS_PER_STREAM, SSE_RETRY_MS, Disconnects, JobwireError
from jobwire.server import validation
from jobwire.server.auth import Principal, at_expiry
from jobwire.server.direct import CLOSE_GRACE, cut_off_when_too_slow
from jobwire.server.errors import RETRY_AFTER, redis_unreachable
from jobwire.server.feed import Feed, reply_refused
from jobwire.server.hub import HubUnavailable
from jobwire.server.render import sse_control
from jobwire.server.routes.jobs import path_job_id
from jobwire.server.services import Admission, Services, services, user_key
from jobwire.server.transports import Send, SseTransport, pump

#: Refusals of a stream said in the log, by error code (a 4xx for what the client sent is a
#: bad request). A refusal for load is said where it is decided (`Admission`).
_REFUSALS = {"unauthenticated": "unauthenticated", "transport_disabled": "transport_off"}
_BAD_REQUEST = (400, 413, 414, 422)


def _refusals_said(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A stream refused before it starts is said in the log, as a websocket's refusal is:
    an EventSource shows its page nothing of a 401's or a 400's JSON."""

    async def said(request: Request) -> Response:
        try:
            return await endpoint(request)
        except JobwireError as exc:
            reason = _REFUSALS.get(exc.code) or ("bad_request" if exc.status in _BAD_REQUEST else None)
            if reason is not None:
                address = request.client.host if request.client else "?"
                services(request).refusals("sse", reason, exc.message, address)
            raise

    return said


def _sse_services(request: Request) -> Services:
    svc = services(request)
    if "sse" not in svc.settings.transports:
        raise JobwireError("transport_disabled", "Server-Sent Events are turned off on this server")
    return svc


@asynccontextmanager
async def _opening(feed: Feed, release: Callable[[], None]) -> AsyncIterator[None]:
    """Until the stream is handed over, any failure closes the feed (else its hub
    subscriptions would outlive the request) and frees the connection slot; Redis being
    down answers 503."""
    try:
        yield
    except BaseException as exc:
        feed.close()
        release()
        if isinstance(exc, HubUnavailable):
            raise JobwireError("unavailable", str(exc), retry_after=RETRY_AFTER) from None
        raise


def _connect(svc: Services, request: Request) -> tuple[Principal, Admission]:
    """Who is asking, and a slot for their stream (429 when they hold too many)."""
    principal = svc.auth.require(request)
    admission = svc.admission("sse", request.client.host if request.client else "?")
    refused = admission.admit(user_key(principal))
    if refused is not None:
        raise refused.error()  # 429 with Retry-After: come back later
    return principal, admission


def _ends_on_goodbye(admission: Admission, feed: Feed) -> Callable[[], None]:
    """End the stream when the server goes away; return what releases the connection."""

    async def goodbye() -> None:
        feed.shutdown()  # no `end`: the client must reconnect (to another process, perhaps)

    admission.on_goodbye(goodbye)
    return admission.release


async def job_events(request: Request) -> Response:
    svc = _sse_services(request)
    job_id = path_job_id(request)
    last_event_id = request.headers.get("last-event-id")
    if last_event_id:
        since, epoch = validation.event_id(last_event_id)
    else:
        since = validation.seq(request.query_params.get("since") or "0", field="since")
        epoch = validation.epoch(request.query_params["epoch"]) if "epoch" in request.query_params else None
    principal, admission = _connect(svc, request)
    release = admission.release
    feed = svc.feed(principal)
    feed.on_too_slow = cut_off_when_too_slow(request.scope, CLOSE_GRACE)  # its writer is stuck
    async with _opening(feed, release):
        snapshot = await svc.store.require(job_id, principal)
        if snapshot["final"] and since >= snapshot["seq"] and epoch in (None, snapshot["epoch"]):
            feed.close()
            release()
            return Response(status_code=204)
        await feed.watch(job_id, since, epoch)
    release = _ends_on_goodbye(admission, feed)
    return _stream(feed, svc, principal, release, with_ids=True)


async def events(request: Request) -> Response:
    svc = _sse_services(request)
    params = request.query_params
    job_ids = validation.job_ids(params.getlist("job"), limit=MAX_JOBS_PER_STREAM, field="job")
    since: dict[str, int] = {}
    for item in params.getlist("since"):
        job_id, _, seq = item.rpartition(":")
        since[validation.job_id(job_id)] = validation.seq(seq, field=f"since for {job_id!r}")
    epochs: dict[str, str] = {}
    for item in params.getlist("epoch"):
        job_id, _, value = item.rpartition(":")
        epochs[validation.job_id(job_id)] = validation.epoch(value, field=f"epoch for {job_id!r}")
    want_all = params.get("all") in ("1", "true")
    principal, admission = _connect(svc, request)
    release = admission.release
    feed = svc.feed(principal)
    feed.on_too_slow = cut_off_when_too_slow(request.scope, CLOSE_GRACE)  # its writer is stuck
    async with _opening(feed, release):
        if want_all:
            await feed.watch_all()
        refused = await feed.watch_many(since, job_ids=job_ids, epochs=epochs)
    notices: list[dict[str, object]] = []
    reply_refused(refused, notices.append)
    release = _ends_on_goodbye(admission, feed)
    return _stream(feed, svc, principal, release, notices=notices)


def _stream(
    feed: Feed,
    svc: Services,
    principal: Principal,
    release: Callable[[], None],
    *,
    with_ids: bool = False,
    notices: list[dict[str, object]] | None = None,
) -> Response:
    """The feed as SSE. A single-job stream (`with_ids`) ends after the job's final event;
    a multiplexed one ends with `end` once the feed is exhausted. A client too slow to
    keep (see `Feed`) has its stream ended without `end`: it reconnects and resumes.

    When the token expires, the stream ends with an `unauthenticated` error ("token
    expired") and no `end`, as a websocket closes 4401 then: the client comes back with a
    new token and resumes from its seqs (`Last-Event-ID`, `since`)."""

    async def run(transport: SseTransport) -> None:
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            feed.shutdown()  # wakes the stream, and nothing more is queued for it

        expiry = at_expiry(principal, expire)
        disconnect = Disconnects.JOB_FINISHED
        try:
            await transport.text(f"retry: {SSE_RETRY_MS}\n\n")
            if notices:
                await transport.text("".join(sse_control(notice) for notice in notices))
            await pump(
                feed,
                transport,
                heartbeat_every=svc.settings.heartbeat_interval,
                after_final=with_ids,
                while_open=True,
            )
            if expired:
                disconnect = Disconnects.TOKEN_EXPIRED
            elif feed.too_slow is not None:
                disconnect = Disconnects.TOO_SLOW
            elif feed.closing:
                disconnect = Disconnects.GOING_AWAY
        except Exception as exc:
            if not redis_unreachable(exc) and not isinstance(exc, RedisError):
                raise
            # Too late for a status: say so, and end; the client resumes from its seqs.
            disconnect = Disconnects.UNAVAILABLE.because(f"job store unavailable, reconnect: {exc}")
        finally:
            if expiry is not None:
                expiry.cancel()
            feed.close()
            release()
        await transport.close(disconnect)

    return _SseResponse(run, lambda send: SseTransport(send, feed, svc.metrics, with_ids=with_ids))


class _SseResponse(Response):
    """An SSE response whose body `run` writes through an `SseTransport`, until it returns
    or the client goes (then it is cancelled)."""

    def __init__(
        self,
        run: Callable[[SseTransport], Awaitable[None]],
        transport: Callable[[Send], SseTransport],
    ) -> None:
        # Not Response.__init__: it would add `content-length: 0` for the empty body.
        self.status_code, self.background = 200, None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self._run, self._transport = run, transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = {asyncio.ensure_future(self._run(self._transport(send))), asyncio.ensure_future(gone())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, OSError):
                raise result


routes = [
    Route(
        "/api/v1/jobs/{job_id:path}/events", _refusals_said(job_events), methods=["GET"], name="job_events"
    ),
    Route("/api/v1/events", _refusals_said(events), methods=["GET"], name="events"),
]
