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


@dataclass(frozen=True, slots=True)
class Resync:
    """Told to a subscriber when its channel may have missed messages (Redis reconnected
    after an outage). The subscriber re-reads history from its last seq, which is
    authoritative, so nothing is lost."""

    channel: str
