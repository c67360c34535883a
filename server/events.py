"""What the hub hands to clients: an event parsed once, ready to send to any number of them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import orjson


@dataclass(frozen=True)  # no slots: cached_property needs the instance __dict__
class Delivery:
    """One job event as received from Redis (live or from history).

    Parsed and framed once per process, not once per client: with 500 sockets on a job
    the server decodes the JSON once and sends the same text 500 times.
    """

    job_id: str
    seq: int
    epoch: str | None
    state: str
    final: bool
    raw: bytes  # the event exactly as the worker wrote it (SSE `data:`)
    frame: str  # the websocket text frame: {"type": "event", ...event}

    @classmethod
    def parse(cls, raw: bytes) -> Delivery:
        doc = orjson.loads(raw)
        frame = '{"type":"event",' + raw[1:].decode()
        return cls(
            doc["job_id"], int(doc["seq"]), doc.get("epoch"), doc["state"], bool(doc["final"]), raw, frame
        )

    @cached_property
    def message(self) -> dict[str, str]:
        """The ASGI message that sends `frame`: built once, sent to every watcher."""
        return {"type": "websocket.send", "text": self.frame}

    @cached_property
    def ws_frame(self) -> bytes:
        """`frame` as a websocket frame on the wire, for `server.direct`: a server's frames
        are not masked, so these bytes are the same for every watcher."""
        return ws_frame(self.frame)

    @cached_property
    def all_ws_frame(self) -> bytes:
        return ws_frame(self.all_frame)

    @cached_property
    def all_frame(self) -> str:
        """The frame for the all-jobs stream, marked `"stream": "all"`.

        Such events are not part of any job's ordered stream (one may arrive after the
        client subscribed to that job, ahead of the replayed history), so clients must be
        able to tell them apart. Built on first use, then shared by every dashboard socket.
        """
        return '{"type":"event","stream":"all",' + self.frame[len('{"type":"event",') :]


@dataclass(frozen=True, slots=True)
class FromAll:
    """A delivery from the all-jobs stream (see `Delivery.all_frame`)."""

    delivery: Delivery


@dataclass(frozen=True)  # no slots: cached_property needs the instance __dict__
class Coalesced:
    """A progress event delivered in place of the `skipped` events just before it.

    Two places coalesce. A client that cannot keep up gets the newest progress rather than
    a backlog: events of the same job and state still waiting to be sent are replaced by
    the latest one, and history trims old progress (see `scripts/record.lua`). And a
    process behind on its pub/sub input coalesces the backlog of each read before the
    fan-out (`server.backlog`): that one is built once and its frame shared by every
    watcher that had the event before the run. Transitions (a new state, a final event)
    are never coalesced. The frame says so with `"coalesced": <skipped>`.
    """

    delivery: Delivery
    skipped: int
    from_all: bool = False

    @cached_property
    def frame(self) -> str:
        base = self.delivery.all_frame if self.from_all else self.delivery.frame
        cut = base.index(",") + 1  # after '{"type":"event",' (and '"stream":"all",')
        if self.from_all:
            cut = base.index(",", cut) + 1
        return f'{base[:cut]}"coalesced":{self.skipped},{base[cut:]}'

    @cached_property
    def raw(self) -> bytes:
        return b'{"coalesced":%d,' % self.skipped + self.delivery.raw[1:]

    @cached_property
    def ws_frame(self) -> bytes:
        """`frame` on the wire, shared by every watcher (see `Delivery.ws_frame`)."""
        return ws_frame(self.frame)


@dataclass(frozen=True, slots=True)
class Resync:
    """Told to a subscriber when its channel may have missed messages (Redis reconnected
    after an outage). The subscriber re-reads history from its last seq, which is
    authoritative, so nothing is lost."""

    channel: str


@dataclass(frozen=True, slots=True)
class Outage:
    """Told to a subscriber when its channel's Redis connection is lost (a Redis restart,
    a cluster shard failing over): its events pause, and a `Resync` follows once the
    channel is subscribed again, wherever it lives by then."""

    channel: str


def ws_frame(text: str) -> bytes:
    """An unmasked, unfragmented text frame (RFC 6455, section 5.2): FIN and opcode 1,
    then the payload's length in 7, 16 or 64 bits."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 1 << 16:
        head = b"\x81\x7e" + n.to_bytes(2, "big")
    else:
        head = b"\x81\x7f" + n.to_bytes(8, "big")
    return head + payload
