"""WebSocket endpoints.

`/ws`: one socket, many jobs. Client messages (JSON text frames)::

    {"op": "subscribe", "job_ids": [...], "since": {"<id>": <seq>}}
    {"op": "unsubscribe", "job_ids": [...]}
    {"op": "subscribe_all"} / {"op": "unsubscribe_all"}
    {"op": "ping"}

Server messages: `{"type": "welcome", "heartbeat"}` first, `{"type": "event", ...event}`,
`{"type": "subscribed", "job_id", "seq"}` (after a job's history has been replayed),
`{"type": "unsubscribed", "job_ids"}`,
`{"type": "resync", "scope": "all"}`, `{"type": "heartbeat", "ts"}`, `{"type": "pong"}`
and `{"type": "error", "code", "message", "job_id"?}`. A malformed message gets an error
message; the socket stays open.

`/ws/jobs/{job_id}?since=N`: one job; closes with 1000 after its final event, with 4404 if
the job does not exist, 4400 for a malformed id or since, 1013 when Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server import validation
from server.events import Delivery, FromAll
from server.feed import Feed, Item, TooManyJobs, error_message
from server.hub import HubUnavailable
from server.services import services

log = logging.getLogger(__name__)

MAX_IDS_PER_MESSAGE = 1000

# Close codes (4000-4999 are the application's own).
CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_NOT_FOUND = 4404


async def _send(ws: WebSocket, item: Item) -> None:
    if isinstance(item, Delivery):
        text = item.frame
    elif isinstance(item, FromAll):
        text = item.delivery.all_frame
    else:
        text = orjson.dumps(item).decode()
    await ws.send_text(text)


async def _run_until_first_done(ws: WebSocket, *coros: Awaitable[None]) -> None:
    """Run the socket's reader and writer; when one ends (disconnect, close), stop both.

    If Redis fails mid-stream the socket is closed with 1013: the client reconnects and
    resumes from its last seq, which loses nothing, where limping on could.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, RedisError):
                log.warning("closing websocket, Redis failed: %s", exc)
                await _close(ws, CLOSE_TRY_AGAIN_LATER, "job store unavailable, reconnect")
            # Starlette raises RuntimeError for a send on a socket the client already closed.
            elif exc is not None and not isinstance(exc, (WebSocketDisconnect, OSError, RuntimeError)):
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _receive_json(ws: WebSocket) -> Any:
    """The next client message, decoded; `_BadMessage` for anything that is not JSON text."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise _BadMessage("invalid_message", "send JSON in text frames, not binary")
    try:
        return orjson.loads(message["text"])
    except orjson.JSONDecodeError:
        raise _BadMessage("invalid_json", "message is not valid JSON") from None


async def _close(ws: WebSocket, code: int, reason: str = "") -> None:
    if ws.application_state == WebSocketState.CONNECTED:
        try:
            await ws.close(code, reason)
        except (RuntimeError, OSError):
            pass  # the client is already gone


class _BadMessage(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# -- /ws ---------------------------------------------------------------------------------


async def _accept(ws: WebSocket) -> bool:
    """Accept the socket, or refuse the upgrade (HTTP 403) when websockets are turned off."""
    if "websocket" not in services(ws).settings.transports:
        await ws.close(code=1008)
        return False
    await ws.accept()
    return True


async def ws_multi(ws: WebSocket) -> None:
    svc = services(ws)
    if not await _accept(ws):
        return
    feed = svc.feed()
    # Tells the client how often to expect a sign of life, so it can detect a dead link.
    feed.post({"type": "welcome", "heartbeat": svc.settings.heartbeat_interval})

    async def read() -> None:
        while True:
            try:
                msg = await _receive_json(ws)
                await _handle(msg, feed)
            except _BadMessage as exc:
                feed.post(error_message(exc.code, exc.message))

    try:
        await _run_until_first_done(ws, read(), _pump(ws, feed, svc.settings.heartbeat_interval))
    finally:
        feed.close()


async def _pump(ws: WebSocket, feed: Feed, heartbeat: float, *, close_after_final: bool = False) -> None:
    """The socket's only writer (so frames never interleave): the feed's events and
    replies, and a heartbeat when idle. A burst is drained without a wait per event."""
    while True:
        item = await feed.next(idle=heartbeat)
        if item is None:
            item = {"type": "heartbeat", "ts": time.time()}
        while item is not None:
            await _send(ws, item)
            if close_after_final and isinstance(item, Delivery) and item.final:
                await ws.close(CLOSE_NORMAL, "job finished")
                return
            item = feed.next_nowait()


async def _handle(msg: Any, feed: Feed) -> None:
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise _BadMessage("invalid_message", 'a message is an object with an "op" field')
    op = msg["op"]
    handler = _OPS.get(op)
    if handler is None:
        raise _BadMessage("unknown_op", f"unknown op {op!r}; expected one of {sorted(_OPS)}")
    try:
        await handler(msg, feed, feed.post)
    except validation.ValidationError as exc:
        raise _BadMessage(exc.code, str(exc)) from None


Reply = Callable[[dict[str, Any]], None]


async def _op_subscribe(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    ids = validation.job_ids(msg.get("job_ids"), limit=MAX_IDS_PER_MESSAGE)
    since = validation.since_map(msg.get("since"))

    async def one(job_id: str) -> None:
        try:
            if not await feed.watch(job_id, since.get(job_id, 0)):
                reply(error_message("job_not_found", f"no job with id {job_id!r}", job_id=job_id))
        except TooManyJobs as exc:
            reply(error_message("too_many_jobs", str(exc), job_id=job_id))
        except (HubUnavailable, RedisError) as exc:
            reply(error_message("unavailable", f"job store unavailable, retry: {exc}", job_id=job_id))

    await asyncio.gather(*(one(job_id) for job_id in ids))


async def _op_unsubscribe(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    ids = validation.job_ids(msg.get("job_ids"), limit=MAX_IDS_PER_MESSAGE)
    for job_id in ids:
        feed.unwatch(job_id)
    reply({"type": "unsubscribed", "job_ids": ids})


async def _op_subscribe_all(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    try:
        await feed.watch_all()
    except HubUnavailable as exc:
        reply(error_message("unavailable", str(exc)))
        return
    reply({"type": "subscribed_all"})


async def _op_unsubscribe_all(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    feed.unwatch_all()
    reply({"type": "unsubscribed_all"})


async def _op_ping(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    reply({"type": "pong", "ts": time.time()})


_OPS = {
    "subscribe": _op_subscribe,
    "unsubscribe": _op_unsubscribe,
    "subscribe_all": _op_subscribe_all,
    "unsubscribe_all": _op_unsubscribe_all,
    "ping": _op_ping,
}


# -- /ws/jobs/{job_id} -------------------------------------------------------------------


async def ws_job(ws: WebSocket) -> None:
    svc = services(ws)
    if not await _accept(ws):
        return
    try:
        job_id = validation.job_id(ws.path_params["job_id"])
        since = validation.seq(ws.query_params.get("since", "0"), field="since")
    except validation.ValidationError as exc:
        await ws.close(CLOSE_BAD_REQUEST, str(exc)[:120])
        return
    feed = svc.feed()
    try:
        try:
            found = await feed.watch(job_id, since)
        except (HubUnavailable, RedisError):
            await _close(ws, CLOSE_TRY_AGAIN_LATER, "job store unavailable, retry")
            return
        if not found:
            await _close(ws, CLOSE_NOT_FOUND, "job not found")
            return

        async def read() -> None:
            # Only to notice the client leaving; what it sends is ignored.
            while True:
                try:
                    await _receive_json(ws)
                except _BadMessage:
                    pass

        await _run_until_first_done(
            ws, read(), _pump(ws, feed, svc.settings.heartbeat_interval, close_after_final=True)
        )
    finally:
        feed.close()
        await _close(ws, CLOSE_NORMAL)


routes = [
    WebSocketRoute("/ws", ws_multi, name="ws"),
    WebSocketRoute("/ws/jobs/{job_id}", ws_job, name="ws_job"),
]
