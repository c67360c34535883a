"""What the hub hands to clients: an event parsed once, ready to send to any number of them.

`Delivery` and `Coalesced` are on the per-delivery path (one built per event read, its
frame written to every watcher), so they are plain `__slots__` classes rather than frozen
dataclasses: a frozen dataclass's `__init__` goes through `object.__setattr__` per field,
and `functools.cached_property` takes a lock per first read on Python 3.11. They are
immutable by convention: nothing assigns to them after construction (their lazily built
attributes fill a slot once, from fields that never change, so every reader sees the
same value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

#: What a job event's websocket frame puts in place of the event's opening `{`.
_EVENT_OPENING = b'{"type":"event",'
_ALL_OPENING = '{"type":"event","stream":"all",'


class Delivery:
    """One job event as received from Redis (live or from history).

    Parsed and framed once per process, not once per client: with 500 sockets on a job
    the server decodes the JSON once and sends the same bytes 500 times. The websocket
    frame on the wire (`ws_frame`, what `server.direct` writes) is built eagerly, since
    nearly every event is written that way; the text forms (`frame`, `message`, the
    all-jobs frames) are built on first use and then shared.

    Immutable by convention (see module docstring). Two deliveries are equal when their
    raw events are: every other field is read from those bytes.
    """

    __slots__ = (
        "job_id",
        "seq",
        "epoch",
        "state",
        "final",
        "raw",
        "ws_frame",
        "_frame",
        "_message",
        "_all_frame",
        "_all_ws_frame",
    )

    job_id: str
    seq: int
    epoch: str | None
    state: str
    final: bool
    raw: bytes  # the event exactly as the worker wrote it (SSE `data:`)
    ws_frame: bytes  # `frame` as a websocket frame on the wire (see `ws_frame()`)

    def __init__(self, job_id: str, seq: int, epoch: str | None, state: str, final: bool, raw: bytes) -> None:
        self.job_id = job_id
        self.seq = seq
        self.epoch = epoch
        self.state = state
        self.final = final
        self.raw = raw
        # A server's frames are not masked, so these bytes are the same for every watcher.
        self.ws_frame = _frame_head(len(raw) + len(_EVENT_OPENING) - 1) + _EVENT_OPENING + raw[1:]
        self._frame: str | None = None
        self._message: dict[str, str] | None = None
        self._all_frame: str | None = None
        self._all_ws_frame: bytes | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Delivery:
        doc = orjson.loads(raw)  # (orjson rejects invalid UTF-8: `frame` can decode `raw`)
        return cls(doc["job_id"], int(doc["seq"]), doc.get("epoch"), doc["state"], bool(doc["final"]), raw)

    @property
    def frame(self) -> str:
        """The websocket text frame: `{"type": "event", ...event}`."""
        frame = self._frame
        if frame is None:
            frame = self._frame = '{"type":"event",' + self.raw[1:].decode()
        return frame

    @property
    def message(self) -> dict[str, str]:
        """The ASGI message that sends `frame`: built once, sent to every watcher."""
        message = self._message
        if message is None:
            message = self._message = {"type": "websocket.send", "text": self.frame}
        return message

    @property
    def all_frame(self) -> str:
        """The frame for the all-jobs stream, marked `"stream": "all"`.

        Such events are not part of any job's ordered stream (one may arrive after the
        client subscribed to that job, ahead of the replayed history), so clients must be
        able to tell them apart. Built on first use, then shared by every dashboard socket.
        """
        frame = self._all_frame
        if frame is None:
            frame = self._all_frame = _ALL_OPENING + self.raw[1:].decode()
        return frame

    @property
    def all_ws_frame(self) -> bytes:
        """`all_frame` on the wire (see `ws_frame`)."""
        frame = self._all_ws_frame
        if frame is None:
            frame = self._all_ws_frame = ws_frame(self.all_frame)
        return frame

    def __eq__(self, other: object) -> bool:
        if type(other) is not Delivery:
            return NotImplemented
        return self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"Delivery(job_id={self.job_id!r}, seq={self.seq!r}, state={self.state!r}, raw={self.raw!r})"


@dataclass(frozen=True, slots=True)
class FromAll:
    """A delivery from the all-jobs stream (see `Delivery.all_frame`)."""

    delivery: Delivery


class Coalesced:
    """A progress event delivered in place of the `skipped` events just before it.

    Two places coalesce. A client that cannot keep up gets the newest progress rather than
    a backlog: events of the same job and state still waiting to be sent are replaced by
    the latest one, and history trims old progress (see `scripts/record.lua`). And a
    process behind on its pub/sub input coalesces the backlog of each read before the
    fan-out (`server.backlog`): that one is built once and its frame shared by every
    watcher that had the event before the run. Transitions (a new state, a final event)
    are never coalesced. The frame says so with `"coalesced": <skipped>`.

    A plain `__slots__` class, immutable by convention, for the reasons in the module
    docstring; its frames are built on first use.
    """

    __slots__ = ("delivery", "skipped", "from_all", "_frame", "_raw", "_ws_frame")

    delivery: Delivery
    skipped: int
    from_all: bool

    def __init__(self, delivery: Delivery, skipped: int, from_all: bool = False) -> None:
        self.delivery = delivery
        self.skipped = skipped
        self.from_all = from_all
        self._frame: str | None = None
        self._raw: bytes | None = None
        self._ws_frame: bytes | None = None

    @property
    def frame(self) -> str:
        frame = self._frame
        if frame is None:
            base = self.delivery.all_frame if self.from_all else self.delivery.frame
            cut = base.index(",") + 1  # after '{"type":"event",' (and '"stream":"all",')
            if self.from_all:
                cut = base.index(",", cut) + 1
            frame = self._frame = f'{base[:cut]}"coalesced":{self.skipped},{base[cut:]}'
        return frame

    @property
    def raw(self) -> bytes:
        raw = self._raw
        if raw is None:
            raw = self._raw = b'{"coalesced":%d,' % self.skipped + self.delivery.raw[1:]
        return raw

    @property
    def ws_frame(self) -> bytes:
        """`frame` on the wire, shared by every watcher (see `Delivery.ws_frame`)."""
        frame = self._ws_frame
        if frame is None:
            frame = self._ws_frame = ws_frame(self.frame)
        return frame

    def _key(self) -> tuple[Any, ...]:
        return (self.delivery, self.skipped, self.from_all)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Coalesced:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Coalesced({self.delivery!r}, skipped={self.skipped!r}, from_all={self.from_all!r})"


class Run:
    """Consecutive events of one job from one read of the hub's input, to be written to a
    watcher in one go (`server.backlog.runs`): a process behind on its input otherwise
    pays a write call, and on loopback the reader's wake-up, per event and watcher, which
    is what caps how much it delivers. A watcher that had the event just before the run
    takes `ws_frames` (every event's frame, joined once for all watchers) in one write;
    any other gets `items` one by one, as if the run had never been joined.

    `first` is the seq the run starts at (a `Coalesced` first item stands for the events
    before its own seq); a watcher takes the joined frames only if its last state is
    `first_state`, where the first item is such a stand-in (it is progress in that state).
    None of the items is final, so nothing in a run ends a stream. A plain `__slots__`
    class, immutable by convention (see module docstring).
    """

    __slots__ = ("items", "job_id", "epoch", "first", "first_state", "seq", "state", "_ws_frames")

    def __init__(self, items: tuple[Delivery | Coalesced, ...]) -> None:
        head, tail = items[0], items[-1]
        self.items = items
        first = head.delivery if type(head) is Coalesced else head
        last = tail.delivery if type(tail) is Coalesced else tail
        self.job_id, self.epoch = first.job_id, first.epoch
        self.first = first.seq - head.skipped if type(head) is Coalesced else first.seq
        self.first_state = first.state if type(head) is Coalesced else None
        self.seq, self.state = last.seq, last.state
        self._ws_frames: bytes | None = None

    @property
    def ws_frames(self) -> bytes:
        """Every event's frame, joined on first use (no watcher in step, or the all-jobs
        stream, which takes a run event by event: never)."""
        frames = self._ws_frames
        if frames is None:
            frames = self._ws_frames = b"".join([item.ws_frame for item in self.items])
        return frames

    def __repr__(self) -> str:
        return f"Run({self.items!r})"


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
    return _frame_head(len(payload)) + payload


#: The heads of the short frames (payloads under 126 bytes), made once.
_SHORT_HEADS = tuple(bytes((0x81, n)) for n in range(126))


def _frame_head(n: int) -> bytes:
    """The head of a text frame of `n` payload bytes (see `ws_frame`)."""
    if n < 126:
        return _SHORT_HEADS[n]
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")
