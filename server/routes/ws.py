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
from jobwire.server import validation
from jobwire.server.events import Delivery, FromAll
from jobwire.server.feed import Feed, Item
from jobwire.server.hub import HubUnavailable
from jobwire.server.services import services
from redis.exceptions import RedisError
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from jobwire.protocol import MAX_IDS_PER_MESSAGE, Close, JobNotFound, JobwireError, Msg, Op

log = logging.getLogger(__name__)


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
                await _close(ws, Close.TRY_AGAIN_LATER, "job store unavailable, reconnect")
            # Starlette raises RuntimeError for a send on a socket the client already closed.
            elif exc is not None and not isinstance(exc, (WebSocketDisconnect, OSError, RuntimeError)):
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _receive_json(ws: WebSocket) -> Any:
    """The next client message, decoded; `JobwireError` for anything that is not JSON text."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise JobwireError("invalid_message", "send JSON in text frames, not binary")
    try:
        return orjson.loads(message["text"])
    except orjson.JSONDecodeError:
        raise JobwireError("invalid_json", "message is not valid JSON") from None


async def _close(ws: WebSocket, code: int, reason: str = "") -> None:
    if ws.application_state == WebSocketState.CONNECTED:
        try:
            await ws.close(code, reason)
        except (RuntimeError, OSError):
            pass  # the client is already gone


# -- /ws ---------------------------------------------------------------------------------


async def _accept(ws: WebSocket) -> bool:
    """Accept the socket, or refuse the upgrade (HTTP 403) when websockets are turned off."""
    if "websocket" not in services(ws).settings.transports:
        await ws.close(code=Close.POLICY)
        return False
    await ws.accept()
    return True


async def ws_multi(ws: WebSocket) -> None:
    svc = services(ws)
    if not await _accept(ws):
        return
    feed = svc.feed()
    # Tells the client how often to expect a sign of life, so it can detect a dead link.
    feed.post({"type": Msg.WELCOME, "heartbeat": svc.settings.heartbeat_interval})

    async def read() -> None:
        while True:
            try:
                msg = await _receive_json(ws)
                await _handle(msg, feed)
            except JobwireError as exc:
                feed.post(exc.as_message())

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
            item = {"type": Msg.HEARTBEAT, "ts": time.time()}
        while item is not None:
            await _send(ws, item)
            if close_after_final and isinstance(item, Delivery) and item.final:
                await ws.close(Close.NORMAL, "job finished")
                return
            item = feed.next_nowait()


async def _handle(msg: Any, feed: Feed) -> None:
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise JobwireError("invalid_message", 'a message is an object with an "op" field')
    op = msg["op"]
    handler = _OPS.get(op)
    if handler is None:
        raise JobwireError("unknown_op", f"unknown op {op!r}; expected one of {sorted(_OPS)}")
    await handler(msg, feed, feed.post)


Reply = Callable[[dict[str, Any]], None]


async def _op_subscribe(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    ids = validation.job_ids(msg.get("job_ids"), limit=MAX_IDS_PER_MESSAGE)
    since = validation.since_map(msg.get("since"))

    async def one(job_id: str) -> None:
        try:
            if not await feed.watch(job_id, since.get(job_id, 0)):
                reply(JobNotFound(job_id, f"no job with id {job_id!r}").as_message(job_id=job_id))
        except JobwireError as exc:
            reply(exc.as_message(job_id=job_id))
        except (HubUnavailable, RedisError) as exc:
            reply(
                JobwireError("unavailable", f"job store unavailable, retry: {exc}").as_message(job_id=job_id)
            )

    await asyncio.gather(*(one(job_id) for job_id in ids))


async def _op_unsubscribe(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    ids = validation.job_ids(msg.get("job_ids"), limit=MAX_IDS_PER_MESSAGE)
    for job_id in ids:
        feed.unwatch(job_id)
    reply({"type": Msg.UNSUBSCRIBED, "job_ids": ids})


async def _op_subscribe_all(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    try:
        await feed.watch_all()
    except HubUnavailable as exc:
        reply(JobwireError("unavailable", str(exc)).as_message())
        return
    reply({"type": Msg.SUBSCRIBED_ALL})


async def _op_unsubscribe_all(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    feed.unwatch_all()
    reply({"type": Msg.UNSUBSCRIBED_ALL})


async def _op_ping(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    reply({"type": Msg.PONG, "ts": time.time()})


_OPS = {
    Op.SUBSCRIBE: _op_subscribe,
    Op.UNSUBSCRIBE: _op_unsubscribe,
    Op.SUBSCRIBE_ALL: _op_subscribe_all,
    Op.UNSUBSCRIBE_ALL: _op_unsubscribe_all,
    Op.PING: _op_ping,
}


# -- /ws/jobs/{job_id} -------------------------------------------------------------------


async def ws_job(ws: WebSocket) -> None:
    svc = services(ws)
    if not await _accept(ws):
        return
    try:
        job_id = validation.job_id(ws.path_params["job_id"])
        since = validation.seq(ws.query_params.get("since", "0"), field="since")
    except JobwireError as exc:
        await ws.close(Close.BAD_REQUEST, exc.message[:120])
        return
    feed = svc.feed()
    try:
        try:
            found = await feed.watch(job_id, since)
        except (HubUnavailable, RedisError):
            await _close(ws, Close.TRY_AGAIN_LATER, "job store unavailable, retry")
            return
        if not found:
            await _close(ws, Close.NOT_FOUND, "job not found")
            return

        async def read() -> None:
            # Only to notice the client leaving; what it sends is ignored.
            while True:
                try:
                    await _receive_json(ws)
                except JobwireError:
                    pass

        await _run_until_first_done(
            ws, read(), _pump(ws, feed, svc.settings.heartbeat_interval, close_after_final=True)
        )
    finally:
        feed.close()
        await _close(ws, Close.NORMAL)


routes = [
    WebSocketRoute("/ws", ws_multi, name="ws"),
    WebSocketRoute("/ws/jobs/{job_id}", ws_job, name="ws_job"),
]
