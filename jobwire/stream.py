"""One client's stream rules, with no I/O and no awaits: what to send, in which order, what
to coalesce, when history must be read, and when the client is too slow to keep.

`server.feed.Feed` is the driver: it subscribes on the hub, reads history, sleeps and
wakes, and hands this core what happened (`push` a live item, `history` a page read,
`pop` what the transport takes). The core answers with what to do next: items to send
(`pop`), reads to make (`need`), and `effects` (subscribe, unsubscribe) for the driver to
perform. Tests drive it directly, with no Redis and no sockets (`tests/test_stream.py`).

The rules, per job:

- **Order, no duplicates, no gaps.** `last[job]` is the last seq handed to the client; a
  live event at `last + 1` (same epoch) is sent; one at or below is a duplicate (already
  sent from history) and dropped; one above is a gap, and history is read from `last`.
  The hub, behind on its input, may hand on progress it coalesced (`server.backlog`): a
  `Coalesced` at seq N with `skipped` k stands for N-k..N, so it is "the next event" for
  a `last` anywhere in N-k-1..N-1, and says `coalesced: N - last - 1` (the hub's shared
  frame when that is k); only a client further behind has a real gap.
  History is authoritative: a seq missing from it was trimmed, and is reported on the next
  event as `coalesced` (progress) or as a `gap` message (past `history_max`).
- **Epochs.** A different epoch means the job's history was lost and began again: the
  client is told `reset` and gets the new history from seq 1.
- **Transitions keep their places.** The first event of each state, and every final event,
  has its own place in the queue. Only progress (an event in the same state as the one
  before it) waits in a replaceable slot: a newer progress event of the job takes its place
  and the event sent says how many it replaced (`coalesced`). So a slow client gets every
  transition and the newest progress, never a backlog.
- **Bounded.** Items that need a history read wait in an inbox of at most `queue_limit`;
  past it they are dropped and every job is read again from history (nothing is lost).
  Queued bytes past `max_bytes` make the client `too_slow`: the transport closes it
  (1013) and it resumes by seq.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from jobwire.protocol import JobwireError, Keys, Msg
from jobwire.server.events import Coalesced, Delivery, FromAll, Outage, Resync, Run

if TYPE_CHECKING:
    from jobwire.lanes import Lane, Sink, Write

#: What a stream yields: a watched job's event, an all-jobs-stream event, either of those
#: standing in for coalesced ones, or a control message (a dict sent as JSON).
Item = Delivery | FromAll | Coalesced | dict[str, Any]
#: What the hub hands over (a `Coalesced` one: progress the hub coalesced at its input).
Live = Delivery | Coalesced | Outage | Resync
#: ... and, from a hub behind on its input, several events of a job for one write.
LiveOrRun = Live | Run

CONTROL_BYTES = 64  # what a queued control message is counted as
_NONE: Any = ()  # an empty queue not made yet: most connections never queue


class Page(Protocol):
    """A history read (`server.store.Stream`)."""

    epoch: str | None
    seq: int
    events: list[Delivery]
    lost: int


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Effect: the job's final event was sent; nothing more follows."""

    job_id: str


Effect = Unsubscribe


class _Slot:
    """A progress event waiting in the queue, which a newer one of the same job and state
    replaces (`skipped` counts those it stands for)."""

    __slots__ = ("delivery", "skipped", "from_all")

    def __init__(self, delivery: Delivery, skipped: int, from_all: bool) -> None:
        self.delivery, self.skipped, self.from_all = delivery, skipped, from_all


#: What a client hears when the Redis that carries its job's events is out of reach.
OUTAGE = JobwireError(
    "unavailable",
    "lost the connection to Redis for these events; they resume here, with nothing missed, once it is back",
)


class ClientStream:
    """The stream rules of one client (see module docstring)."""

    def __init__(self, keys: Keys, *, queue_limit: int, max_bytes: int) -> None:
        self._keys = keys
        self._queue_limit, self._max_bytes = queue_limit, max_bytes
        self._inbox: deque[tuple[bool, Live]] = _NONE
        self._out: deque[Item | _Slot] = _NONE
        self._merge: dict[str, _Slot] = {}  # job -> its progress slot waiting in _out
        self._merge_all: dict[str, _Slot] = {}  # the same for the all-jobs stream
        self._state: dict[str, str] = {}  # job -> state of the last event handed on
        self._all_state: dict[str, str] = {}  # the same for the all-jobs stream
        self._out_bytes = self._inbox_bytes = 0
        self.last: dict[str, int] = {}  # watched job -> last seq handed to the client
        self.epoch: dict[str, str | None] = {}  # watched job -> the epoch `last` counts in
        self.following: set[str] = set()  # watched jobs not final yet (followed on the hub)
        self._all_last: dict[str, int] = {}  # all-jobs stream: unfinished job -> last seq
        self.all = False
        self.overflowed = False
        self.too_slow: str | None = None
        self._told: set[str] = set()  # jobs ("" for the all-jobs stream) told of an outage
        self.effects: list[Effect] = []
        #: The transport's direct write of a ready-made frame, used only when nothing waits
        #: before it (so the order holds); False means "not now", and the item is queued.
        self.write_now: Callable[[bytes, int], bool] | None = None
        self.write_finals = True  # False: a final event is queued (to close after it)
        self.sending = False  # the transport is in a send: nothing is written directly
        #: Watched jobs whose position the hub keeps for this core while it rides their
        #: channel's lane with the watchers in step (`jobwire.lanes`): `last` and `_state`
        #: of such a job are the lane's, read into this core when it lands (`land`).
        self.riding: dict[str, tuple[Lane, Sink]] = {}  # job -> its lane, and this core's sink there

    # -- watching -----------------------------------------------------------------------

    def begin(self, job_id: str, since: int, epoch: str | None) -> None:
        """The client asks for `job_id` after `since` (in `epoch`, if it knows one)."""
        self.last[job_id] = since
        self.epoch[job_id] = epoch
        self.following.add(job_id)

    def end(self, job_id: str) -> bool:
        """Stop watching `job_id`; True if it was followed live (unsubscribe it)."""
        riding = self.riding.pop(job_id, None)
        if riding is not None:
            lane, sink = riding
            lane.land(sink)
        self.last.pop(job_id, None)
        self.epoch.pop(job_id, None)
        self._state.pop(job_id, None)
        if job_id in self.following:
            self.following.discard(job_id)
            return True
        return False

    def first_page(
        self, job_id: str, page: Page, claimed_epoch: str | None, since: int | None = None
    ) -> bool:
        """History after `since` (what the client asked for) as first read; True if the
        client must be reset (the history it counted in is gone): then read from 0 and
        call `reset`. A live event taken while the read was on its way may have moved the
        position past the page's seq: that is no loss."""
        if self.riding:
            self.land()
        if since is None:
            since = self.last.get(job_id, 0)
        if page.seq < since or (claimed_epoch is not None and claimed_epoch != page.epoch):
            return True
        self.epoch[job_id] = page.epoch
        self.advance(job_id, page)
        return False

    def subscribed(self, job_id: str) -> None:
        """History replayed: live from here."""
        if self.riding:
            self.land()
        self.post({"type": Msg.SUBSCRIBED, "job_id": job_id, "seq": self.last[job_id]})

    def page(self, job_id: str, since: int, page: Page | None) -> bool:
        """History read after `since` (the last seq when the read went out: live events may
        have moved on meanwhile), after a gap or resync; True if the client must be reset."""
        if self.riding:
            self.land()
        if job_id not in self.last or page is None:
            return False  # unwatched meanwhile; or gone (the next event resets)
        if page.epoch != self.epoch.get(job_id) or page.seq < since:
            return True
        self.advance(job_id, page)
        return False

    def reset(self, job_id: str, epoch: str | None) -> bool:
        """The job's history was lost and began again: tell the client, forget its seqs;
        the driver reads the new history from 0 next (`advance`). True if the job had
        ended in the old history: the driver follows it on the hub again."""
        if self.riding:
            self.land()
        self.last[job_id] = 0
        self.epoch[job_id] = epoch
        self._merge.pop(job_id, None)
        self._state.pop(job_id, None)
        self.post({"type": Msg.RESET, "job_id": job_id, "epoch": epoch})
        if job_id in self.following:
            return False
        self.following.add(job_id)
        return True

    def advance(self, job_id: str, page: Page) -> None:
        """Hand on the events of `page` the client has not had (see module docstring)."""
        if self.riding:
            self.land()
        for event in page.events:
            last = self.last.get(job_id)
            if last is None:
                return  # unwatched meanwhile
            if event.seq <= last:
                continue
            skipped = event.seq - last - 1
            if skipped and page.lost > last:
                self._merge.pop(job_id, None)
                self.post({"type": Msg.GAP, "job_id": job_id, "from": last + 1, "to": event.seq - 1})
                skipped = 0
            self._emit(event, skipped)

    def watch_all(self) -> None:
        self.all = True

    def unwatch_all(self) -> None:
        self.all = False
        self._all_last.clear()
        self._all_state.clear()

    # -- live items ----------------------------------------------------------------------

    def live(self, item: LiveOrRun) -> ClientStream | None:
        """A live item of a watched job's channel, from the hub (its sink: no wrapper, as
        this runs once per event and watcher). The driver's `wake` is called when there
        is something to send or to read, or the client became `too_slow`.

        The common case first: the next event of a watched job, not final, nothing
        waiting, and the socket takes it now. Then its twin under overload: progress the
        hub coalesced, for a client that had the event just before the run, which takes
        the hub's shared frame as it is. And a `Run` of events (a hub behind on its input):
        taken in one write by a client that had the event before it, else event by event.

        Returns this core when it took the item directly with nothing waiting: the hub
        may then take it on its lane of watchers in step (`jobwire.lanes`), which writes
        the next items without calling this at all; else None.
        """
        if (
            type(item) is Delivery
            and self.write_now is not None
            and not (self._out or self._inbox or self.overflowed or item.final or self.sending)
            and self.too_slow is None
        ):
            job_id = item.job_id
            if (
                self.last.get(job_id, -1) + 1 == item.seq
                and item.epoch == self.epoch.get(job_id)
                and self.write_now(item.ws_frame, 1)
            ):
                self.last[job_id] = item.seq
                if self._state.get(job_id) != item.state:  # a transition: it went out in its place
                    self._state[job_id] = item.state
                return self  # in step, nothing waiting: it may ride the job's lane
        elif (
            type(item) is Coalesced
            and self.write_now is not None
            and not (self._out or self._inbox or self.overflowed or self.sending)
            and self.too_slow is None
        ):
            event = item.delivery
            job_id = event.job_id
            if (
                self.last.get(job_id, -1) + 1 + item.skipped == event.seq
                and event.epoch == self.epoch.get(job_id)
                and self._state.get(job_id) == event.state
                and self.write_now(item.ws_frame, 1)
            ):
                self.last[job_id] = event.seq
                return self  # (as above)
        elif type(item) is Run:
            job_id = item.job_id
            if (
                self.write_now is not None
                and not (self._out or self._inbox or self.overflowed or self.sending)
                and self.too_slow is None
                and self.last.get(job_id, -1) + 1 == item.first
                and item.epoch == self.epoch.get(job_id)
                and (item.first_state is None or self._state.get(job_id) == item.first_state)
                and self.write_now(item.ws_frames, len(item.items))
            ):
                self.last[job_id] = item.seq
                self._state[job_id] = item.state
                return self  # (as above)
            for each in item.items:  # as if the hub had not joined them
                self.live(each)
            return
        if self._push(False, item):
            self.wake()
        if self.effects:
            self.perform()

    def live_all(self, item: LiveOrRun) -> None:
        """A live item of the all-jobs stream, from the hub (see `live`)."""
        if type(item) is Run:
            for each in item.items:
                self.live_all(each)
            return
        if self._push(True, item):
            self.wake()

    def wake(self) -> None:
        """Set by the driver: there is something to send or to read (or the client must go)."""

    def perform(self) -> None:
        """Set by the driver: carry out `effects` (and clear them). Not a wake: a final
        event written at once leaves the writer nothing to do, only a subscription to drop."""

    # -- riding a lane (see `jobwire.lanes`) ------------------------------------------------

    def board(self, lane: Lane, sink: Sink) -> Write | None:
        """The lane of `lane.job_id` takes this core (its `sink` there) on at its position
        (the event this core just took directly); the write for the lane to use."""
        if self.write_now is None or self.queued or self.sending or self.too_slow is not None:
            return None
        self.riding[lane.job_id] = (lane, sink)
        return self.write_now

    def landed(self, job_id: str, seq: int, state: str) -> None:
        """The lane let this core off at `seq` in `state`: its own position again."""
        self.riding.pop(job_id, None)
        if job_id in self.last:
            self.last[job_id] = seq
            self._state[job_id] = state

    def land(self) -> None:
        """Leave every lane, taking their positions: before anything a rider must not do
        (queue an item, send, read a position, stop writing directly)."""
        for lane, sink in list(self.riding.values()):
            lane.land(sink)  # (which says where: `landed`)
        self.riding.clear()

    def handed_on(self) -> int:
        """The sum of the last seqs handed on (the feed's heartbeat skip), riding or not."""
        total = sum(self.last.values())
        for job_id, (lane, _) in self.riding.items():
            total += lane.seq - self.last.get(job_id, 0)
        return total

    def _push(self, from_all: bool, item: Live) -> bool:
        """Handled at once when it needs no history read and nothing waits before it, else
        it waits in the inbox."""
        if self.too_slow is not None:
            return False
        if not self._inbox and not self.overflowed and self._handle_now(from_all, item):
            pass
        elif len(self._inbox) >= self._queue_limit:
            self._inbox = _NONE
            self._inbox_bytes = 0
            self.overflowed = True
        else:
            if self.riding:
                self.land()
            if not self._inbox:
                self._inbox = deque()
            self._inbox.append((from_all, item))
            self._inbox_bytes += _size(item)
        if self._out_bytes + self._inbox_bytes > self._max_bytes:
            self.mark_too_slow(f"client too slow: over {self._max_bytes} bytes queued; resume by seq")
            return True
        return bool(self._out or self._inbox or self.overflowed)

    def need(self) -> str | list[str] | None:
        """Work through the inbox as far as it goes without Redis. Returns what must be read
        before the next item: a job's history (its id), every live job's (after an
        overflow: a list), or None when nothing is to be read."""
        if self.overflowed:
            self.overflowed = False
            if self.all:
                self._all_last.clear()
                self._merge_all.clear()
                self.post({"type": Msg.RESYNC, "scope": "all"})
            return list(self.following)
        while self._inbox:
            from_all, item = self._inbox.popleft()
            self._inbox_bytes -= _size(item)
            if not self._handle_now(from_all, item):
                if isinstance(item, Delivery):
                    job_id: str | None = item.job_id
                elif isinstance(item, Coalesced):
                    job_id = item.delivery.job_id
                else:
                    job_id = self._keys.job_id_from_channel(item.channel)
                if job_id is not None and job_id in self.last:
                    return job_id
        return None

    def ready_without_reads(self) -> bool:
        """The next inbox item needs no read (so a writer may drain it without a wait)."""
        if self.overflowed or not self._inbox:
            return False
        from_all, item = self._inbox[0]
        if not self._handle_now(from_all, item):
            return False
        _, item = self._inbox.popleft()
        self._inbox_bytes -= _size(item)
        return True

    def _handle_now(self, from_all: bool, item: Live) -> bool:
        """Handle a live item that needs no Redis read; False if it needs a backfill."""
        if isinstance(item, Outage):
            self._tell_outage(from_all, item.channel)
            return True
        if isinstance(item, Resync):
            if from_all:
                self._told.discard("")
                self._all_last.clear()
                self._merge_all.clear()
                self.post({"type": Msg.RESYNC, "scope": "all"})
                return True
            job_id = self._keys.job_id_from_channel(item.channel)
            self._told.discard(job_id or "")
            return job_id not in self.following
        if isinstance(item, Coalesced):  # the hub's: it stands for the `skipped` before it
            event, run = item.delivery, item.skipped
        else:
            event, run = item, 0
        job_id = event.job_id
        if from_all:
            if not self.all or job_id in self.last or event.seq <= self._all_last.get(job_id, 0):
                return True  # watched jobs arrive on their own channel, in order
            if event.final:
                self._all_last.pop(job_id, None)
            else:
                self._all_last[job_id] = event.seq
            self._enqueue(event, run, True)
            return True
        last = self.last.get(job_id)
        if last is None:
            return True  # not watched any more
        if event.epoch != self.epoch.get(job_id):
            return False  # the job's history began again: a backfill resets the client
        if event.seq <= last:
            return True  # already delivered from history
        if event.seq - run <= last + 1:
            # The next event; for a coalesced one, the client had some seq of its run or
            # the one before it, and is told what it did not get.
            self._emit(event, event.seq - last - 1)
            return True
        return False  # a gap: read history from `last`

    def _tell_outage(self, from_all: bool, channel: str) -> None:
        """Never silent: the client hears that these events pause, and that they resume
        by themselves (a resync follows once Redis is back). Once per outage: a link that
        keeps failing before it is back says so once, not once per try."""
        job_id = "" if from_all else self._keys.job_id_from_channel(channel)
        if job_id is None or job_id in self._told:
            return
        if from_all and self.all:
            self.post(OUTAGE.as_message(scope="all"))
        elif job_id in self.following:
            self.post(OUTAGE.as_message(job_id=job_id))
        else:
            return
        self._told.add(job_id)

    # -- the queue -----------------------------------------------------------------------

    def post(self, message: dict[str, Any]) -> None:
        """Queue a control message in order with the events."""
        self._queue(message, CONTROL_BYTES)

    def pop(self) -> Item | None:
        """The next item to send, if one is queued."""
        if not self._out:
            return None
        item = self._out.popleft()
        if type(item) is _Slot:
            delivery = item.delivery
            merge = self._merge_all if item.from_all else self._merge
            if merge.get(delivery.job_id) is item:
                del merge[delivery.job_id]
            self._out_bytes -= len(delivery.raw)
            if item.skipped:
                return Coalesced(delivery, item.skipped, item.from_all)
            return FromAll(delivery) if item.from_all else delivery
        if isinstance(item, Delivery):
            self._out_bytes -= len(item.raw)
        elif isinstance(item, (FromAll, Coalesced)):
            self._out_bytes -= len(item.delivery.raw)
        else:
            self._out_bytes -= CONTROL_BYTES
        return item  # type: ignore[return-value]

    def pop_event(self) -> Item | None:
        """The next queued item if it is an event (to join events into one write)."""
        if self._out and type(self._out[0]) is not dict:
            return self.pop()
        return None

    @property
    def queued(self) -> bool:
        return bool(self._out or self._inbox or self.overflowed)

    @property
    def queued_bytes(self) -> int:
        """What waits for this client, in bytes (events as sent, control messages as 64)."""
        return self._out_bytes + self._inbox_bytes

    def stalled(
        self, now: float, timeout: float, sending_since: float | None, pinged: float | None
    ) -> str | None:
        """The clock's tick: why the client is too slow to keep, if it accepted nothing for
        `timeout` seconds (a send blocked since `sending_since`, or a keepalive ping
        unanswered since `pinged`); else None."""
        if sending_since is not None and now - sending_since > timeout:
            return f"client too slow: accepted nothing for {timeout:g}s; resume by seq"
        if pinged is not None and now - pinged > timeout:
            return f"client too slow: answered no ping for {timeout:g}s; resume by seq"
        return None

    def mark_too_slow(self, reason: str) -> None:
        """The client cannot keep up: drop what waits; its transport closes it (1013)."""
        if self.too_slow is None:
            if self.riding:
                self.land()
            self.too_slow = reason
            self._out = self._inbox = _NONE
            self._merge.clear()
            self._merge_all.clear()
            self._out_bytes = self._inbox_bytes = 0

    def _queue(self, item: Item | _Slot, size: int) -> None:
        if self.riding:
            self.land()
        if not self._out:
            self._out = deque()
        self._out.append(item)
        self._out_bytes += size

    def _emit(self, event: Delivery, skipped: int = 0) -> None:
        self.last[event.job_id] = event.seq
        self._enqueue(event, skipped, False)
        if event.final and event.job_id in self.following:
            # Nothing follows a final event: free the subscription, keep the seq so that
            # a late duplicate is still recognised.
            self.following.discard(event.job_id)
            self.effects.append(Unsubscribe(event.job_id))

    def _enqueue(self, event: Delivery, skipped: int, from_all: bool) -> None:
        """Hand `event` on: written directly when nothing waits, else queued; a progress
        event takes the place of the job's progress still waiting (see module docstring)."""
        states = self._all_state if from_all else self._state
        job_id = event.job_id
        transition = event.final or states.get(job_id) != event.state
        states[job_id] = event.state
        merge = self._merge_all if from_all else self._merge
        if (
            self.write_now is not None
            and not self._out
            and not self.sending
            and not skipped
            and (self.write_finals or not event.final)
            and self.write_now(event.all_ws_frame if from_all else event.ws_frame, 1)
        ):
            return  # (nothing was queued, so no slot waits to be replaced)
        slot = merge.get(job_id)
        if not transition and slot is not None and slot.delivery.epoch == event.epoch:
            self._out_bytes += len(event.raw) - len(slot.delivery.raw)
            slot.skipped += 1 + skipped
            slot.delivery = event
            return
        if transition:
            # Its own place: later progress queues behind it, in a slot of its own.
            merge.pop(job_id, None)
            if skipped:
                self._queue(Coalesced(event, skipped, from_all), len(event.raw))
            else:
                self._queue(FromAll(event) if from_all else event, len(event.raw))
            return
        slot = merge[job_id] = _Slot(event, skipped, from_all)
        self._queue(slot, len(event.raw))


def _size(item: Live) -> int:
    """What a live item waiting in the inbox counts for (an event as sent)."""
    if type(item) is Delivery:
        return len(item.raw)
    return len(item.delivery.raw) if type(item) is Coalesced else 0
