"""celery-progress's endpoints, served by jobwire: a page built on celery-progress's
`CeleryProgressBar` (or `CeleryWebSocketProgressBar`) works with its URL changed, nothing more.

`GET /celery-progress/{task_id}/` (with or without the trailing slash) answers the job's
latest event in celery-progress's JSON (see `server.celery_progress`), as its Django view
does: never cached, `PENDING` for an id jobwire does not know (or that is another tenant's).
Auth as on every endpoint: a bearer header or `?token=` (celery-progress's JS sets no
headers, so a page puts the token in the URL it is given). A malformed id is a 422 JSON error.

The websocket at the same path sends the same JSON: the job's current state at once, then
one message per event, and closes (1000) after the final one. celery-progress's JS sends
`{"type": "check_task_completion"}` when it opens; the current state has gone out already,
so what a client sends is read only to notice it leaving. Everything else is `/ws/jobs/{id}`'s
machinery, unchanged: the Origin check, admission and connection limits, auth (`?token=`,
or a first `{"op": "auth"}` message), the close at the token's expiry (4401), the goodbye
when the server shuts down (1001), and slow clients closed 1013. An unknown id gets the
`PENDING` answer, then a 4404 close: celery-progress's bar shows "Waiting for task to
start...", as it does for an id its own server does not know, and no subscription is
held open for a job that cannot be seen.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from jobwire.protocol import Disconnects, JobwireError, dumps
from jobwire.server import celery_progress as answers
from jobwire.server import validation
from jobwire.server.auth import Principal
from jobwire.server.errors import JSON, redis_unreachable
from jobwire.server.events import Coalesced
from jobwire.server.feed import Feed
from jobwire.server.metrics import Metrics
from jobwire.server.render import delivery_of
from jobwire.server.routes.jobs import caller

# The single-job websocket's steps, shared rather than copied: opening (Origin, transport,
# admission, auth, goodbye), running reader and writer to the first end (token expiry,
# too slow, Redis errors), reading a client's message.
from jobwire.server.routes.ws import open_socket, receive_json, refuse_bad_request, run_until_first_done
from jobwire.server.services import Services
from jobwire.server.transports import WebSocketTransport, close_websocket, pump
from jobwire.stream import Item

#: What Django's `never_cache` (celery-progress's view) sends: a poll must reach the server.
NO_CACHE = "max-age=0, no-cache, no-store, must-revalidate, private"


async def progress(request: Request) -> Response:
    svc, principal = caller(request)
    job_id = validation.job_id(request.path_params["task_id"])
    return JSON(await current(svc, job_id, principal), headers={"Cache-Control": NO_CACHE})


async def current(svc: Services, job_id: str, principal: Principal) -> dict[str, Any]:
    """celery-progress's answer for the job now: from its latest event, which the
    websocket sent too (the snapshot alone keeps no retry countdown)."""
    snapshot = await svc.store.snapshot(job_id, principal)
    if snapshot is None:
        return answers.unknown()
    stream = await svc.store.events_since(job_id, max(snapshot["seq"] - 1, 0), principal)
    if stream is not None and stream.events:
        return answers.from_event(orjson.loads(stream.events[-1].raw))
    return answers.from_snapshot(snapshot)  # its history began again meanwhile


# -- the websocket -----------------------------------------------------------------------


# Per event, not per watcher: each watcher has the same bytes. Kept small: an event may
# carry a result of up to 256 KB.
@functools.lru_cache(maxsize=64)
def _frame(raw: bytes) -> str:
    return dumps(answers.from_event(orjson.loads(raw))).decode()


class CeleryProgressSocket(WebSocketTransport):
    """A websocket that carries celery-progress's JSON: each event rendered as its answer,
    and nothing else (celery-progress's JS calls any other message a data error and closes,
    so control messages and heartbeats are not sent; uvicorn's pings keep the link checked).

    Every frame goes through the feed's queue and this writer: no jobwire frame is written
    directly (`write_now`), since what a watcher of this socket reads is another rendering.
    """

    def __init__(self, ws: WebSocket, feed: Feed, metrics: Metrics, *, socket_send_buffer: int) -> None:
        super().__init__(ws, feed, metrics, socket_send_buffer=socket_send_buffer)
        self._direct = feed.write_now = None

    async def write(self, item: Item) -> None:
        delivery = delivery_of(item)
        if delivery is None:
            return
        feed = self._feed
        feed.sending_since = self._loop.time()
        await self._send({"type": "websocket.send", "text": _frame(delivery.raw)})
        feed.sending_since = None
        self._metrics.ws_deliveries.n += 1
        if isinstance(item, Coalesced):
            self._metrics.coalesced.inc(item.skipped)

    async def write_many(self, items: list[Item]) -> None:
        for item in items:
            await self.write(item)

    async def heartbeat(self) -> None:
        pass


async def progress_socket(ws: WebSocket) -> None:
    opened = await open_socket(ws)
    if opened is None:
        return
    svc, principal, release = opened
    try:
        job_id = validation.job_id(ws.path_params["task_id"])
    except JobwireError as exc:
        await refuse_bad_request(ws, svc, release, exc.message)
        return
    feed = svc.feed(principal)
    try:
        try:
            # From the latest event on: celery-progress's socket answers with the task's
            # state now, then each update.
            snapshot = await svc.store.snapshot(job_id, principal)
            found = snapshot is not None and await feed.watch(
                job_id, max(snapshot["seq"] - 1, 0), snapshot["epoch"]
            )
        except Exception as exc:
            if not redis_unreachable(exc):
                raise
            await close_websocket(ws, Disconnects.UNAVAILABLE)
            return
        if not found:
            try:
                await ws.send_text(dumps(answers.unknown()).decode())
            except (RuntimeError, OSError, WebSocketDisconnect):
                return  # the client is gone already
            await close_websocket(ws, Disconnects.NOT_FOUND)
            return

        async def read() -> None:
            # Only to notice the client leaving; what it sends is ignored.
            while True:
                try:
                    await receive_json(ws)
                except JobwireError:
                    pass

        transport = CeleryProgressSocket(
            ws, feed, svc.metrics, socket_send_buffer=svc.settings.socket_send_buffer
        )

        async def to_the_end() -> None:
            await pump(feed, transport, heartbeat_every=svc.settings.heartbeat_interval, after_final=True)
            await transport.close(Disconnects.JOB_FINISHED)

        await run_until_first_done(transport, feed, principal, read(), to_the_end())
    finally:
        feed.close()
        release()
        await close_websocket(ws, Disconnects.CLOSED)


# The trailing-slash routes first: `{task_id:path}` alone would take "<id>/" as the id.
routes = [
    Route("/celery-progress/{task_id:path}/", progress, methods=["GET"], name="celery_progress"),
    Route("/celery-progress/{task_id:path}", progress, methods=["GET"]),
    WebSocketRoute("/celery-progress/{task_id:path}/", progress_socket, name="celery_progress_ws"),
    WebSocketRoute("/celery-progress/{task_id:path}", progress_socket),
]
