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
- A walker boards when its core took a plain event directly with nothing waiting (its
  `live` returns the core, a `Rider`), at the lane's position: the event just carried,
  or any event while the lane has no riders (which sets the position).
- The lane carries only the next event of its position (same job and epoch, seq + 1),
  not final: a final event ends streams, which the cores do. Anything else (a gap, a
  new epoch, progress the hub coalesced, a run, an outage, a resync) first lands every
  rider (`disband`), and the item goes to every watcher's core.
- A rider whose socket does not take the event (its buffer is full, it is closing) lands
  at the position before it, and its core gets the event as any walker does: queued.
- A core lands by itself (`Rider.land`) before anything that would not hold for a rider:
  something queued, a send in progress, a read of its position, too slow, another
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

    def carries(self, job_id: str, seq: int, epoch: str | None, final: bool) -> bool:
        """Whether an event with these fields is the riders' next one."""
        return seq == self.seq + 1 and not final and epoch == self.epoch and job_id == self.job_id

    def carry(self, frame: bytes, seq: int, state: str) -> None:
        """Write the next event (`carries`) to every rider; a rider whose socket does not
        take it lands before it (it becomes a walker, to get it from its core)."""
        fell = []
        for sink, write in tuple(self.riders.items()):  # (whatever a write sets off)
            try:
                if not write(frame, 1):
                    fell.append(sink)
            except Exception:  # (a socket's trouble is that socket's: the others go on)
                log.exception("jobwire lane: a rider's write failed")
                fell.append(sink)
        before, was = self.seq, self.state
        self.seq, self.state = seq, state
        for sink in fell:
            self._land(sink, before, was)

    def board(self, sink: Sink, rider: Rider, job_id: str, seq: int, epoch: str | None, state: str) -> None:
        """`rider` (behind walker `sink`) took this event directly with nothing waiting:
        on it comes, if it is at the lane's position (any, while no one rides)."""
        if self.riders:
            # (A walker boards on the event just carried, so this holds; checked all the same:
            # a rider at another position would be written events it does not follow.)
            if seq != self.seq or epoch != self.epoch or job_id != self.job_id:
                return
        else:
            self.job_id, self.seq, self.epoch, self.state = job_id, seq, epoch, state
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
