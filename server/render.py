"""One rendering of a stream's items to what each transport sends: a websocket text frame
(or its bytes on the wire, for direct writes), an SSE message. Every transport asks here,
so an item is an event, or final, by one definition."""

from __future__ import annotations

import time
from typing import Any

import orjson

from jobwire.protocol import Msg
from jobwire.server.events import Coalesced, Delivery, FromAll, ws_frame
from jobwire.stream import Item

EVENTS = (Delivery, FromAll, Coalesced)
SSE_KEEPALIVE = ": keepalive\n\n"


def delivery_of(item: Item) -> Delivery | None:
    """The job event an item carries (None for a control message)."""
    if type(item) is Delivery:
        return item
    return item.delivery if isinstance(item, (FromAll, Coalesced)) else None


def is_final(item: Item) -> bool:
    """The job's final event (nothing of that job follows it)."""
    delivery = delivery_of(item)
    return delivery is not None and delivery.final


def heartbeat() -> dict[str, Any]:
    return {"type": Msg.HEARTBEAT, "ts": time.time()}


# -- websocket ---------------------------------------------------------------------------


def ws_text(item: Item) -> str:
    """The text frame's payload."""
    if type(item) is Delivery:
        return item.frame
    if isinstance(item, FromAll):
        return item.delivery.all_frame
    if isinstance(item, Coalesced):
        return item.frame
    return orjson.dumps(item).decode()


def ws_bytes(item: Item) -> bytes:
    """The whole frame as written to the socket (a server's frames are not masked, so an
    event's are built once and shared by every watcher)."""
    if type(item) is Delivery:
        return item.ws_frame
    if isinstance(item, FromAll):
        return item.delivery.all_ws_frame
    return ws_frame(ws_text(item))


# -- SSE ---------------------------------------------------------------------------------


def sse_control(message: dict[str, Any]) -> str:
    return f"event: control\ndata: {orjson.dumps(message).decode()}\n\n"


def sse_text(item: Item, *, with_ids: bool) -> str | None:
    """The SSE message for `item`, or None when this stream does not carry it.

    A single-job stream (`with_ids`) carries the job's events with `id: <epoch>:<seq>`
    (what EventSource sends back as Last-Event-ID), and of control messages only those
    that matter to it: a reset, an error (such as an outage notice). A multiplexed one
    carries events without ids (the client tracks seqs per job), the all-jobs stream's as
    `event: all`, and every control message."""
    if isinstance(item, FromAll):
        return f"event: all\ndata: {item.delivery.raw.decode()}\n\n"
    if isinstance(item, (Delivery, Coalesced)):
        if isinstance(item, Coalesced) and item.from_all:
            return f"event: all\ndata: {item.raw.decode()}\n\n"
        if not with_ids:
            return f"data: {item.raw.decode()}\n\n"
        event = item if isinstance(item, Delivery) else item.delivery
        tag = f"{event.epoch}:{event.seq}" if event.epoch else str(event.seq)
        return f"id: {tag}\ndata: {item.raw.decode()}\n\n"
    if with_ids and item.get("type") not in (Msg.RESET, Msg.ERROR):
        return None
    return sse_control(item)
