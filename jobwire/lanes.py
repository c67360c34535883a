"""The watchers of one channel, and among them those in step: one loop writes each event
to all of those.

Why
---
Fanning an event out to a thousand sockets one `ClientStream.live` call at a time costs
the stream core's checks per socket (is anything queued, is this the next seq, the
epoch, the state), on a dozen objects per socket that the write call before has pushed
out of the CPU's caches: measured, most of jobwire's Python per delivery. Yet nearly
every watcher of a busy job is in the same place, with nothing queued, taking the next
event as it comes. A `Lane` keeps those apart as *riders*, all at one position (the last
seq handed on, its epoch and state, kept once for the lane instead of once per watcher),
and writes the next event to each of them with nothing but the socket's own write
(`carry`). Every other watcher, a *walker*, gets each item from its own stream core as
before.

The rules
---------
- A walker boards when its core took an item directly with nothing waiting (its `live`
  returns the core, a `Rider`), at the lane's position: the item just carried, or any
  while the lane has no riders (which sets the position).
- The lane carries what continues its position (a `Step`: a plain event at seq + 1, or
  progress the hub coalesced or a run that starts there, in the riders' state for a
  stand-in), never a final event: a final event ends streams, which the cores do.
  Anything else (a gap, a new epoch, a final event, an outage, a resync) first lands
  every rider (`disband`), and the item goes to every watcher's core.
- A rider whose socket does not take it (its buffer is full, it is closing) lands at the
  position before it, and its core gets the item as any walker does: queued.
- A core lands by itself (`ClientStream.land`) before anything that would not hold for a
  rider: something queued, a send in progress, a read of its position, too slow, another
  writer, the job unwatched.
- Landing hands the core the lane's position (`Rider.landed`), so a core's own position
  is right whenever it reads it.

No I/O and no awaits here: the hub drives it (`server.hub`), the cores are
`jobwire.stream.ClientStream`; tests drive both with no Redis and no sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from jobwire.server.events import Coalesced, Delivery, Run

log = logging.getLogger(__name__)

#: A hub subscriber (see `server.hub.Sink`); what it returns says whether it may ride.
Sink = Callable[[Any], "Rider | None"]
#: A rider's write of a ready-made frame (`n` frames joined); False: not taken.
Write = Callable[[bytes, int], bool]


class Rider(Protocol):
    """A watcher's stream core, as a lane sees it (`jobwire.stream.ClientStream`)."""

    def board(self, lane: Lane, sink: Sink) -> Write | None:
        """The lane takes this core (subscribed as `sink`) on at its position; the write to
        use, or None to stay off."""

    def landed(self, job_id: str, seq: int, state: str) -> None:
        """The lane lets this core off at `seq` (in `state`): its own position from now."""


class Step:
    """What a lane may carry, as it moves the riders' position: a plain event, progress the
    hub coalesced at its input (`Coalesced`), or a run of events for one write (`Run`);
    never a final event. `first` is the seq it starts at (a stand-in starts where the
    events it stands for began), and a rider takes it only in `first_state` (None: in any
    state), as its stream core would (`ClientStream.live`'s fast paths)."""

    __slots__ = ("job_id", "epoch", "first", "first_state", "seq", "state", "item", "count")

    def __init__(
        self,
        job_id: str,
        epoch: str | None,
        first: int,
        first_state: str | None,
        seq: int,
        state: str,
        item: Delivery | Coalesced | Run,
        count: int,
    ) -> None:
        self.job_id, self.epoch, self.first, self.first_state = job_id, epoch, first, first_state
        self.seq, self.state, self.item, self.count = seq, state, item, count

    @property
    def frame(self) -> bytes:
        """What a rider is written: the item's frame, or a run's joined frames (built only
        when there are riders to write them to)."""
        item = self.item
        return item.ws_frames if type(item) is Run else item.ws_frame  # type: ignore[union-attr]


def step_of(item: object) -> Step | None:
    """The `Step` a hub item is, or None where a lane never carries it (a final event, an
    outage, a resync: each rider's core must see those)."""
    kind = type(item)
    if kind is Delivery:
        event: Delivery = item  # type: ignore[assignment]
        if event.final:
            return None
        return Step(event.job_id, event.epoch, event.seq, None, event.seq, event.state, event, 1)
    if kind is Coalesced:
        stand_in: Coalesced = item  # type: ignore[assignment]
        event = stand_in.delivery
        first, state = event.seq - stand_in.skipped, event.state
        return Step(event.job_id, event.epoch, first, state, event.seq, state, stand_in, 1)
    if kind is Run:
        run: Run = item  # type: ignore[assignment]
        count = len(run.items)
        return Step(run.job_id, run.epoch, run.first, run.first_state, run.seq, run.state, run, count)
    return None


class Lane:
    """One channel's watchers: the riders (in step, see module docstring) and the walkers.

    Behaves as the set of every watcher (`add`, `discard`, `in`, `len`, iteration) for the
    hub's reference counts."""

    __slots__ = ("walkers", "riders", "cores", "job_id", "epoch", "seq", "state")

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.walkers: set[Sink] = set(sinks)
        self.riders: dict[Sink, Write] = {}
        self.cores: dict[Sink, Rider] = {}
        self.job_id = ""
        self.epoch: str | None = None
        self.seq = -1
        self.state = ""

    # -- the set of watchers -------------------------------------------------------------

    def add(self, sink: Sink) -> None:
        if sink not in self.riders:
            self.walkers.add(sink)

    def update(self, sinks: Iterable[Sink]) -> None:
        for sink in sinks:
            self.add(sink)

    def discard(self, sink: Sink) -> None:
        """Forget `sink` (it unsubscribed): a rider leaves without landing, its core is
        done with the job."""
        self.walkers.discard(sink)
        if self.riders.pop(sink, None) is not None:
            del self.cores[sink]

    def __contains__(self, sink: object) -> bool:
        return sink in self.walkers or sink in self.riders

    def __len__(self) -> int:
        return len(self.walkers) + len(self.riders)

    def __iter__(self) -> Iterator[Sink]:
        yield from list(self.walkers)
        yield from list(self.riders)

    # -- riding ----------------------------------------------------------------------------

    def follows(self, step: Step) -> bool:
        """Whether `step` is the riders' next one (it starts where they are)."""
        return (
            step.first == self.seq + 1
            and step.epoch == self.epoch
            and step.job_id == self.job_id
            and (step.first_state is None or step.first_state == self.state)
        )

    def carry(self, step: Step) -> None:
        """Write the next step (`follows`) to every rider; a rider whose socket does not
        take it lands before it (it becomes a walker, to get it from its core)."""
        frame, count = step.frame, step.count
        fell = []
        for sink, write in tuple(self.riders.items()):  # (whatever a write sets off)
            try:
                if not write(frame, count):
                    fell.append(sink)
            except Exception:  # (a socket's trouble is that socket's: the others go on)
                log.exception("jobwire lane: a rider's write failed")
                fell.append(sink)
        before, was = self.seq, self.state
        self.seq, self.state = step.seq, step.state
        for sink in fell:
            self._land(sink, before, was)

    def board(self, sink: Sink, rider: Rider, step: Step) -> None:
        """`rider` (behind walker `sink`) took `step` directly with nothing waiting: on it
        comes, if that leaves it at the lane's position (any, while no one rides)."""
        if self.riders:
            # (A walker boards on the step just carried, so this holds; checked all the same:
            # a rider at another position would be written events it does not follow.)
            if step.seq != self.seq or step.epoch != self.epoch or step.job_id != self.job_id:
                return
        else:
            self.job_id, self.seq, self.epoch, self.state = step.job_id, step.seq, step.epoch, step.state
        write = rider.board(self, sink)
        if write is None:
            return
        self.walkers.discard(sink)
        self.riders[sink] = write
        self.cores[sink] = rider

    def disband(self) -> None:
        """Every rider lands (the next item is not one the lane carries)."""
        for sink in list(self.riders):
            self._land(sink, self.seq, self.state)

    def land(self, sink: Sink) -> None:
        """The rider behind `sink` asks to land (its core's `land`)."""
        if sink in self.riders:
            self._land(sink, self.seq, self.state)

    def _land(self, sink: Sink, seq: int, state: str) -> None:
        del self.riders[sink]
        core = self.cores.pop(sink)
        self.walkers.add(sink)
        core.landed(self.job_id, seq, state)
