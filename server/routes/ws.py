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
the job does not exist (or is not the caller's), 4400 for a malformed id or since, 1013
when Redis is unreachable.

Both authenticate first (see `open_socket`), and close with 4401 when the token expires.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import orjson
from redis.exceptions import RedisError
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from jobwire.protocol import MAX_IDS_PER_MESSAGE, Disconnect, Disconnects, JobwireError, Msg, Op
from jobwire.server import validation
from jobwire.server.auth import Principal, at_expiry
from jobwire.server.direct import denial_sent, detach, raw_send
from jobwire.server.errors import error_response, redis_unreachable
from jobwire.server.feed import Feed, reply_refused
from jobwire.server.limits import Pace, Refusal
from jobwire.server.services import Admission, Services, services, user_key
from jobwire.server.transports import WebSocketTransport, close_websocket, pump

log = logging.getLogger(__name__)

Release = Callable[[], None]  # gives back a connection's place in the limits
Writer = Coroutine[Any, Any, None]  # a socket's writer (see `Duplex`)


class Duplex:
    """A socket's writer and reader, stopped together: `write` (the writer) runs in a task
    of its own, the reader is the body of `async with`, in the handler's task; when one
    ends (disconnect, close), the other is stopped, and the socket closed saying why.

    The reader runs in the handler's task, and this is a context manager rather than a
    coroutine awaiting the reader, because an idle connection should cost little: no
    task, no `asyncio.wait` and no frame of their own for what an idle socket only waits
    in. Stopping the reader is cancelling this task, from a callback (never in the
    reader's own turn), and taking that cancellation back where it arrives
    (`Task.uncancel`, as `asyncio.timeout` does): a cancellation from outside (the server
    giving up on its tasks) still goes through.

    Two more reasons stop them, without a task of their own: the token expiring (closed
    4401: come back with a new one) and the client too slow to keep (1013, see `Feed`:
    resume by seq). If Redis fails mid-stream the socket is closed with 1013 too: the
    client reconnects and resumes from its last seq, which loses nothing, where limping on
    could.
    """

    __slots__ = (
        "_transport",
        "_feed",
        "_principal",
        "_write",
        "_writer",
        "_task",
        "_stopped",
        "_state",
        "_expiry",
    )

    def __init__(self, transport: WebSocketTransport, feed: Feed, principal: Principal, write: Writer):
        self._transport, self._feed, self._principal = transport, feed, principal
        self._write: Writer | None = write
        self._writer: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._stopped: Disconnect | None = None  # the first reason given to `_stop`
        self._state = _READY
        self._expiry: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Duplex:
        self._task = asyncio.current_task()
        assert self._write is not None and self._task is not None
        self._writer = writer = asyncio.ensure_future(self._write)
        self._write = None
        writer.add_done_callback(self._interrupt)  # done callbacks run in a turn of their own
        self._feed.on_too_slow = self._too_slow
        self._expiry = at_expiry(self._principal, self._expired)
        self._state = _READING
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        interrupted = self._state is _INTERRUPTED
        self._state = _DONE
        writer, task = self._writer, self._task
        assert writer is not None and task is not None
        try:
            if isinstance(exc, asyncio.CancelledError):
                if not interrupted or task.uncancel():
                    return False  # from outside, not (only) ours: it goes on
                exc = None
            elif exc is not None and not isinstance(exc, Exception):
                return False
            # Stop the writer before closing: it may be blocked in a send to a client too
            # slow to read, and the close must not wait behind it.
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if self._stopped is not None:
                if self._stopped.label == Disconnects.TOO_SLOW.label:
                    log.info("closing websocket: %s", self._stopped.reason)
                await self._transport.close(self._stopped)
                return True
            failed = exc if exc is not None or writer.cancelled() else writer.exception()
            if failed is None:
                return True
            if redis_unreachable(failed):
                log.warning("closing websocket, Redis unreachable: %s", failed)
                await self._transport.close(Disconnects.UNAVAILABLE)
            elif isinstance(failed, RedisError):
                log.error("closing websocket, Redis error: %s", failed)
                await self._transport.close(Disconnects.INTERNAL)
            # Starlette raises RuntimeError for a send on a socket the client already closed.
            elif not isinstance(failed, (WebSocketDisconnect, OSError, RuntimeError)):
                if failed is exc:
                    return False  # the reader's: raised on as it was
                raise failed
            return True
        finally:
            self._feed.on_too_slow = None
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            if not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    def _interrupt(self, _: object = None) -> None:
        if self._state is _READING:  # the task waits in the reader: stop it there
            self._state = _INTERRUPTED
            assert self._task is not None
            self._task.cancel()

    def _stop(self, disconnect: Disconnect) -> None:
        if self._stopped is None:
            self._stopped = disconnect
        if self._writer is not None:
            self._writer.cancel()
        asyncio.get_running_loop().call_soon(self._interrupt)  # _stop may be called by the reader

    def _too_slow(self, reason: str) -> None:
        self._stop(Disconnects.TOO_SLOW.because(reason))

    def _expired(self) -> None:
        self._stop(Disconnects.TOKEN_EXPIRED)


_READY, _READING, _INTERRUPTED, _DONE = "ready", "reading", "interrupted", "done"  # a Duplex's states


async def run_until_first_done(
    transport: WebSocketTransport,
    feed: Feed,
    principal: Principal,
    read: Coroutine[Any, Any, None],
    write: Coroutine[Any, Any, None],
) -> None:
    """`read` and `write` run as a `Duplex`: for a reader that is a coroutine of its own."""
    async with Duplex(transport, feed, principal, write):
        await read


async def run_session(ws: WebSocket, session: Coroutine[Any, Any, None]) -> None:
    """Run an accepted socket's `session` (all of the handler after `open_socket`): handed
    to jobwire's own protocol to run past the ASGI call where it can be (see
    `server.direct.detach`: the middleware and the router hold nothing for an idle
    connection then), else here."""
    if not detach(ws, session):
        await session


async def receive_json(ws: WebSocket) -> Any:
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


# -- connecting ---------------------------------------------------------------------------


def _origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    """Browsers always send Origin on a websocket; a page on another site must not be
    able to open one with the user's cookies or network position (cross-site websocket
    hijacking). Clients that are not browsers send none."""
    origin = ws.headers.get("origin")
    if origin is None or origin in allowed:
        return True
    return urlsplit(origin).netloc.lower() == ws.headers.get("host", "").lower()  # the server's own


def _origin_refused(ws: WebSocket, allowed: tuple[str, ...]) -> str:
    """What the log says of a refused Origin: the page's browser shows nothing of it."""
    return (
        f"Origin {ws.headers.get('origin')!r:.200} is neither this server's own "
        f"({ws.headers.get('host', '?')!r:.200}) nor in JOBWIRE_ALLOWED_ORIGINS "
        f"({', '.join(allowed) or 'empty'}); add it there to let pages from it connect"
    )


async def open_socket(ws: WebSocket) -> tuple[Services, Principal, Callable[[], None]] | None:
    """Accept the socket and learn who is on it, or refuse it (and return None).

    Refused before the upgrade: a disallowed Origin or websockets turned off (HTTP 403,
    final), too many connections from the address or too many new ones (HTTP 429 with
    `Retry-After`: later). After it, with a close code and reason: no valid token within
    `auth_timeout` (4401), too many connections for the user (1013: later). The token comes
    in a header, in `?token=`, or (browsers cannot set headers) in a first message
    `{"op": "auth", "token": ...}`.
    """
    svc = services(ws)
    settings = svc.settings
    admission = svc.admission("websocket", _address(ws))  # says refusals too
    if "websocket" not in settings.transports:
        off = Disconnects.TRANSPORT_OFF
        admission.refuse(off.label, f"{off.reason} (JOBWIRE_TRANSPORTS={','.join(settings.transports)})")
        await ws.close(code=off.code)
        return None
    if not _origin_allowed(ws, settings.allowed_origins):
        admission.refuse(Disconnects.FORBIDDEN.label, _origin_refused(ws, settings.allowed_origins))
        await ws.close(code=Disconnects.FORBIDDEN.code)
        return None
    # An address over its limits is refused before the upgrade: the cheapest answer to a flood.
    refused = admission.admit(complete=False)
    if refused is not None:
        await _refuse_for_load(ws, refused)
        return None
    opened = None
    try:
        opened = await _authenticate(ws, svc, admission)
    finally:
        if not opened:
            admission.release()
    return opened


async def _refuse_for_load(ws: WebSocket, refused: Refusal) -> None:
    """Too many connections, or too many new ones: "later", never "no". Before the upgrade
    that is HTTP 429 with `Retry-After` and the JSON error (never the 403 of a refusal
    for good, such as an Origin's); a server without ASGI's websocket denial responses
    cannot send one, so the socket is accepted and closed 1013 there."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        error = refused.error()
        response = error_response(error.status, error.code, error.message)
        response.headers["Retry-After"] = str(refused.retry_after)
        await ws.send_denial_response(response)
        denial_sent(raw_send(ws))
    else:
        await ws.accept()
        await close_websocket(ws, Disconnects.LOAD.because(refused.message))


async def _authenticate(
    ws: WebSocket, svc: Services, admission: Admission
) -> tuple[Services, Principal, Callable[[], None]] | None:
    settings = svc.settings
    await ws.accept()
    try:
        principal = svc.auth.principal(ws)
        if principal is None:
            async with asyncio.timeout(settings.auth_timeout):
                msg = await receive_json(ws)
            if not isinstance(msg, dict) or msg.get("op") != Op.AUTH:
                raise JobwireError("unauthenticated", 'authenticate first: {"op": "auth", "token": ...}')
            principal = svc.auth.verify(msg.get("token"))  # type: ignore[arg-type]
    except TimeoutError:
        await _refuse(
            ws, admission, Disconnects.UNAUTHENTICATED.because(f"no token within {settings.auth_timeout:g}s")
        )
        return None
    except JobwireError as exc:
        await _refuse(ws, admission, Disconnects.UNAUTHENTICATED.because(exc.message))
        return None
    refused = admission.admit_user(user_key(principal))
    if refused is not None:
        await close_websocket(ws, Disconnects.LOAD.because(refused.message))
        return None

    admission.on_goodbye(functools.partial(close_websocket, ws, Disconnects.GOING_AWAY))
    return svc, principal, admission.release


async def _refuse(ws: WebSocket, admission: Admission, disconnect: Disconnect) -> None:
    """Refuse an accepted socket: said in the log, then closed with the code and reason."""
    admission.refuse(disconnect.label, disconnect.reason)
    await close_websocket(ws, disconnect)


def _cost(msg: Any) -> float:
    """What a message costs the socket's pace: 1, plus 1 per 100 job ids it names (a
    subscribe of 1,000 unknown ids is the work of eleven small messages)."""
    ids = msg.get("job_ids") if isinstance(msg, dict) else None
    return 1 + len(ids) / 100 if isinstance(ids, list) else 1


#: A message costing more than this (naming over 100 job ids) waits for the process's
#: `big_messages` lock. Each socket's pace bounds what it may ask, but twenty sockets each
#: within their burst, all subscribing to 1,000 ids at once, were twenty turns of a
#: millisecond or more in every pass of the event loop: every other client's ping waited
#: behind all of them (p99 from 3 to 137 ms, measured with benchmarks/abuse.py). Taken one
#: at a time, a flood waits on the lock, where it costs nothing, and the loop runs at most
#: one such turn between other clients' work. Small messages never wait.
BIG_MESSAGE_COST = 2.0


# -- /ws ---------------------------------------------------------------------------------


async def ws_multi(ws: WebSocket) -> None:
    opened = await open_socket(ws)
    if opened is not None:
        await run_session(ws, _multi_session(ws, *opened))


async def _multi_session(ws: WebSocket, svc: Services, principal: Principal, release: Release) -> None:
    feed = svc.feed(principal)
    # Tells the client how often to expect a sign of life, so it can detect a dead link.
    feed.post({"type": Msg.WELCOME, "heartbeat": svc.settings.heartbeat_interval})
    pace = Pace(svc.settings.ws_messages_per_second)

    try:
        transport = _transport(ws, feed, svc)
        writer = pump(feed, transport, heartbeat_every=svc.settings.heartbeat_interval)
        async with Duplex(transport, feed, principal, writer):  # reading here, in this task
            while True:
                try:
                    msg = await receive_json(ws)
                    cost = _cost(msg)
                    if not pace.take(cost):
                        # Told once per burst; a client that keeps on regardless is closed.
                        if pace.refused == 1:
                            raise JobwireError("rate_limited", "too many messages; slow down")
                        if pace.refused > pace.capacity:
                            await close_websocket(ws, Disconnects.TOO_MANY_MESSAGES)
                            return
                        continue
                    if cost > BIG_MESSAGE_COST:
                        async with svc.big_messages:
                            await _handle(msg, feed)
                    else:
                        await _handle(msg, feed)
                except JobwireError as exc:
                    feed.post(exc.as_message())
    finally:
        feed.close()
        release()


def _transport(ws: WebSocket, feed: Feed, svc: Services) -> WebSocketTransport:
    return WebSocketTransport(ws, feed, svc.metrics, socket_send_buffer=svc.settings.socket_send_buffer)


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
    epochs = validation.epoch_map(msg.get("epochs"))
    # Redis out of reach (or a subscription it does not confirm) ends the socket with 1013,
    # as mid-stream: every client reconnects after it and subscribes again from its seqs,
    # where an error reply would leave a job unwatched until the client thought to retry.
    refused = await feed.watch_many(since, job_ids=ids, epochs=epochs)
    reply_refused(refused, reply)


async def _op_unsubscribe(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    ids = validation.job_ids(msg.get("job_ids"), limit=MAX_IDS_PER_MESSAGE)
    for job_id in ids:
        feed.unwatch(job_id)
    reply({"type": Msg.UNSUBSCRIBED, "job_ids": ids})


async def _op_subscribe_all(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    try:
        await feed.watch_all()
    except JobwireError as exc:
        reply(exc.as_message())
        return
    reply({"type": Msg.SUBSCRIBED_ALL})


async def _op_unsubscribe_all(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    feed.unwatch_all()
    reply({"type": Msg.UNSUBSCRIBED_ALL})


async def _op_ping(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    reply({"type": Msg.PONG, "ts": time.time()})


async def _op_auth(msg: dict[str, Any], feed: Feed, reply: Reply) -> None:
    reply(JobwireError("invalid_message", "already authenticated; reconnect to change tokens").as_message())


_OPS = {
    Op.SUBSCRIBE: _op_subscribe,
    Op.UNSUBSCRIBE: _op_unsubscribe,
    Op.SUBSCRIBE_ALL: _op_subscribe_all,
    Op.UNSUBSCRIBE_ALL: _op_unsubscribe_all,
    Op.PING: _op_ping,
    Op.AUTH: _op_auth,
}


# -- /ws/jobs/{job_id} -------------------------------------------------------------------


def _address(ws: WebSocket) -> str:
    return ws.client.host if ws.client else "?"


async def refuse_bad_request(ws: WebSocket, svc: Services, release: Callable[[], None], why: str) -> None:
    """A single-job socket whose path or query is malformed: its place in the limits given
    back, the refusal said in the log, the socket closed 4400 saying why."""
    release()
    svc.refusals("websocket", Disconnects.BAD_REQUEST.label, why, _address(ws))
    await close_websocket(ws, Disconnects.BAD_REQUEST.because(why))


async def ws_job(ws: WebSocket) -> None:
    opened = await open_socket(ws)
    if opened is not None:
        await run_session(ws, _job_session(ws, *opened))


async def _job_session(ws: WebSocket, svc: Services, principal: Principal, release: Release) -> None:
    try:
        job_id = validation.job_id(ws.path_params["job_id"])
        since = validation.seq(ws.query_params.get("since", "0"), field="since")
        epoch = validation.epoch(ws.query_params["epoch"]) if "epoch" in ws.query_params else None
    except JobwireError as exc:
        await refuse_bad_request(ws, svc, release, exc.message)
        return
    feed = svc.feed(principal)
    try:
        try:
            found = await feed.watch(job_id, since, epoch)
        except Exception as exc:
            if not redis_unreachable(exc):
                raise
            await close_websocket(ws, Disconnects.UNAVAILABLE)
            return
        if not found:
            await close_websocket(ws, Disconnects.NOT_FOUND)
            return

        transport = _transport(ws, feed, svc)
        feed.write_finals = False  # the final event goes through the queue: the close follows it

        async def to_the_end() -> None:
            await pump(feed, transport, heartbeat_every=svc.settings.heartbeat_interval, after_final=True)
            await transport.close(Disconnects.JOB_FINISHED)

        async with Duplex(transport, feed, principal, to_the_end()):
            while True:  # only to notice the client leaving; what it sends is ignored
                try:
                    await receive_json(ws)
                except JobwireError:
                    pass
    finally:
        feed.close()
        release()
        await close_websocket(ws, Disconnects.CLOSED)


routes = [
    WebSocketRoute("/ws", ws_multi, name="ws"),
    WebSocketRoute("/ws/jobs/{job_id:path}", ws_job, name="ws_job"),
]
