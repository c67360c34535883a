"""One interface for every way the server sends a stream: write an item, write many, close
with a `Disconnect`. A websocket (the direct frame writer when the socket can take a frame
now, the ASGI send otherwise) and an SSE stream (the ASGI send of an HTTP body) implement
it, and one `pump` moves a feed's items to either: the same batching, heartbeats, metrics
and "stop after the final event" for all of them.

What differs stays in each transport: how an item is rendered (`server.render`), what a
heartbeat is, and what a disconnect looks like on the wire (a close frame with a code and
a reason; for SSE, a last control message where the client must learn why, then the end
of the body).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from jobwire.protocol import TOKEN_EXPIRED, Disconnect, Disconnects, JobwireError, Msg
from jobwire.server.auth import unauthenticated
from jobwire.server.direct import (
    CLOSE_GRACE,
    bound_kernel_buffer,
    cut_off_later,
    frame_writer,
    ping_waiting_since,
    raw_send,
)
from jobwire.server.events import Coalesced, Delivery
from jobwire.server.feed import Feed
from jobwire.server.metrics import Metrics
from jobwire.server.render import (
    EVENTS,
    SSE_KEEPALIVE,
    heartbeat,
    is_final,
    sse_control,
    sse_text,
    ws_bytes,
    ws_text,
)
from jobwire.stream import Item

Send = Callable[[dict[str, Any]], Awaitable[None]]

_BATCH = 64  # events joined into one write, at most


class Transport(Protocol):
    """How a stream's items reach one client."""

    kind: str  # "websocket" or "sse": the metrics' label

    async def write(self, item: Item) -> None: ...
    async def write_many(self, items: list[Item]) -> None: ...
    async def heartbeat(self) -> None: ...
    async def close(self, disconnect: Disconnect) -> None: ...


async def pump(
    feed: Feed,
    transport: Transport,
    *,
    heartbeat_every: float,
    after_final: bool = False,
    while_open: bool = False,
) -> None:
    """Send the feed's items through `transport`: its only writer, so frames never
    interleave. A burst is drained without a wait per event, and events waiting together
    go out in one write. Returns after a final event (`after_final`: single-job streams),
    or once the feed is exhausted (`while_open`: an SSE stream, which ends then); a
    websocket's runs until its connection ends and the task is cancelled."""
    while not (while_open and feed.exhausted):
        item = await feed.next(idle=heartbeat_every)
        if item is None:
            if while_open and feed.exhausted:
                return
            await transport.heartbeat()
            continue
        while item is not None:
            if isinstance(item, EVENTS):
                batch = _take_events(feed, item)
                await transport.write_many(batch)
                last = batch[-1]
            else:
                await transport.write(item)
                last = item
            if after_final and is_final(last):
                return
            item = feed.next_nowait()


def _take_events(feed: Feed, first: Item) -> list[Item]:
    """`first` and the queued events after it, up to `_BATCH` and up to a final one."""
    batch = [first]
    while not is_final(batch[-1]) and len(batch) < _BATCH and (nxt := feed.next_queued_event()) is not None:
        batch.append(nxt)
    return batch


# -- websocket -----------------------------------------------------------------------------


class WebSocketTransport:
    """A websocket: frames written directly to the socket when it can take them at once
    (see `server.direct`: the hub's dispatch does too, through the feed), else through the
    server's own ASGI send, which waits while the socket is full (`feed.sending_since`
    says since when, for `StallWatch`)."""

    kind = "websocket"
    __slots__ = ("_ws", "_feed", "_metrics", "_loop", "_send", "_direct")  # one per connection

    def __init__(self, ws: WebSocket, feed: Feed, metrics: Metrics, *, socket_send_buffer: int) -> None:
        self._ws, self._feed, self._metrics = ws, feed, metrics
        self._loop = asyncio.get_running_loop()
        # The server's own ASGI send: Starlette's WebSocket.send re-checks the socket's
        # state and its wrappers add a call per layer, a real share of a delivery's cost.
        self._send = raw_send(ws)
        bound_kernel_buffer(self._send, socket_send_buffer)
        self._direct = feed.write_now = frame_writer(self._send, metrics.ws_written)
        feed.ping_since = ping_waiting_since(self._send)  # an unanswered ping is a stall too

    async def write(self, item: Item) -> None:
        feed = self._feed
        feed.sending_since = self._loop.time()
        if type(item) is Delivery:
            await self._send(item.message)  # built once, shared by every watcher
        else:
            await self._send({"type": "websocket.send", "text": ws_text(item)})
        feed.sending_since = None
        if isinstance(item, EVENTS):
            self._metrics.ws_deliveries.n += 1
            if isinstance(item, Coalesced):
                self._metrics.coalesced.inc(item.skipped)

    async def write_many(self, items: list[Item]) -> None:
        if self._direct is not None and self._direct(b"".join(map(ws_bytes, items)), len(items)):
            for item in items:
                if isinstance(item, Coalesced):
                    self._metrics.coalesced.inc(item.skipped)
            return
        for item in items:
            await self.write(item)

    async def heartbeat(self) -> None:
        await self.write(heartbeat())

    async def close(self, disconnect: Disconnect) -> None:
        if disconnect.label == Disconnects.TOO_SLOW.label:
            self._metrics.slow_closed.labels(self.kind).inc()
        if disconnect is Disconnects.JOB_FINISHED:
            # The stream is complete: the client reads to its end at its own pace, with no
            # grace period that would cut a slow reader off before the final event.
            try:
                await self._ws.close(disconnect.code, disconnect.reason)
            except (RuntimeError, OSError, WebSocketDisconnect):
                pass
            return
        await close_websocket(self._ws, disconnect)


async def close_websocket(ws: WebSocket, disconnect: Disconnect, *, grace: float = CLOSE_GRACE) -> None:
    """Close with the disconnect's code and reason, giving the client `grace` seconds to
    take the close frame.

    The frame waits behind whatever the client has not read, and uvicorn, closing, waits
    for its buffer to drain first: a client that reads nothing would hold the connection
    open (ESTABLISHED, measured 30 s and more) however the close was meant. So a client
    that has not gone after `grace` is cut off (a reset, nothing more sent); it resumes
    by seq, as after any drop.
    """
    if ws.application_state != WebSocketState.CONNECTED:
        return
    cut_off_later(raw_send(ws), grace)
    try:
        async with asyncio.timeout(grace):  # the send waits while the socket is full
            await ws.close(disconnect.code, _reason(disconnect.reason))
    except (RuntimeError, OSError, WebSocketDisconnect, TimeoutError):
        pass  # the client is already gone, or is being cut off


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455): cut by bytes, not characters,
    or a reason quoting a non-ASCII id cannot be sent and the socket just drops."""
    raw = text.encode()
    return raw[:123].decode(errors="ignore") if len(raw) > 123 else text


# -- SSE -----------------------------------------------------------------------------------


class SseTransport:
    """An SSE stream: the body of an HTTP response, sent through ASGI (which waits while
    the socket is full)."""

    kind = "sse"

    def __init__(self, send: Send, feed: Feed, metrics: Metrics, *, with_ids: bool) -> None:
        self._send, self._feed, self._metrics, self._with_ids = send, feed, metrics, with_ids
        self._loop = asyncio.get_running_loop()

    async def text(self, text: str) -> None:
        """Send raw SSE text (the preamble, a notice)."""
        self._feed.sending_since = self._loop.time()
        await self._send({"type": "http.response.body", "body": text.encode(), "more_body": True})
        self._feed.sending_since = None

    async def write(self, item: Item) -> None:
        await self.write_many([item])

    async def write_many(self, items: list[Item]) -> None:
        texts = []
        for item in items:
            text = sse_text(item, with_ids=self._with_ids)
            if text is None:
                continue
            texts.append(text)
            if isinstance(item, (Delivery, Coalesced)):
                self._metrics.sse_deliveries.n += 1
                if isinstance(item, Coalesced):
                    self._metrics.coalesced.inc(item.skipped)
        if texts:
            await self.text("".join(texts))

    async def heartbeat(self) -> None:
        await self.text(SSE_KEEPALIVE)

    async def close(self, disconnect: Disconnect) -> None:
        """End the stream, saying why where the client must act on it: a token that
        expired (come back with a new one), Redis out of reach (resume later), or the end
        of a multiplexed stream (nothing more will come: do not reconnect)."""
        if disconnect.label == Disconnects.TOO_SLOW.label:
            self._metrics.slow_closed.labels(self.kind).inc()
        elif disconnect is Disconnects.TOKEN_EXPIRED:
            await self.text(sse_control(unauthenticated(TOKEN_EXPIRED).as_message()))
        elif disconnect.label == Disconnects.UNAVAILABLE.label:
            await self.text(sse_control(JobwireError("unavailable", disconnect.reason).as_message()))
        elif disconnect is Disconnects.JOB_FINISHED and not self._with_ids:
            await self.text(sse_control({"type": Msg.END}))
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
