"""A backlog on the hub's pub/sub input, coalesced per job before the fan-out.

Why here
--------
A process offered more deliveries than it can make (100 events a second on one job to
4,000 clients is 400,000 deliveries a second; one process makes about 85,000) falls
behind on its *input*: the events wait in the socket to Redis and in Redis's output
buffer, before any client's queue, where the clients' own coalescing (`jobwire.stream`)
cannot reach them. Measured: nothing coalesced, latency 11 s. A progress server's clients
want the newest progress now, not a ten-second-old one.

The hub sees such a backlog without a timer: one read of the socket brings everything
that arrived since the last read (`server.pubsub_conn`). When the process keeps up, a
read holds one event, or events of different channels; when it falls behind, a read holds
several events of the same channel. Those, and only those, are coalesced here: the
fan-out then costs one delivery per job and read, however far behind the input is, so
the delay stays about one read's worth of work.

The rule (per channel, in order)
--------------------------------
An event is *progress* when it continues the channel's previous event: same job, same
epoch, same state, the next seq, neither of them final. Anything else (a new state, a
final event, a seq that does not follow, a job's first event seen) is kept, in its place.
Of each run of consecutive progress events in one read, only the newest is kept, as a
`Coalesced` whose `skipped` counts the events it replaced (plus any count they already
carried): with seq N and `skipped` k it stands for seqs N-k..N, all in one state, none of
them a transition. A client that had seq N-k-1 takes it as it is; one that had a later
seq of the run takes it with its own, smaller count; one further behind reads history,
which the hub never touches (`ClientStream`). So no transition is ever dropped, the
newest progress always goes out, and the counts add up with the seqs.

"The previous event" reaches across reads: `previous` keeps, per channel, the last event
a coalescing read saw, so the first event of the next such read is judged against it.
Requiring the next seq makes a stale or missing entry safe: the event is kept.

Joined writes
-------------
What is left of a read after coalescing is mostly transitions (a job changing state
faster than the process keeps up: every one of them kept). Each would still cost a write
call per watcher, and on loopback the reader's wake-up too, which is most of a
delivery's cost. So the events a read keeps for one channel are cut into runs
(`runs`): consecutive seqs of one job and epoch, none final. A watcher that had the
event before a run takes it in one write of the frames joined once for all watchers
(`events.Run`); any other takes its events one by one. A process behind on its input
thus delivers more per second the further behind it is, instead of less.
"""

from __future__ import annotations

from jobwire.server.events import Coalesced, Delivery, Run

#: A live job event as the hub hands it to sinks: as published, or standing for several.
Event = Delivery | Coalesced


def continues(previous: Delivery, event: Delivery, carried: int = 0) -> bool:
    """`event` (standing for `carried` events just before it) is progress that directly
    follows `previous`."""
    return (
        event.seq - carried == previous.seq + 1
        and event.state == previous.state
        and not event.final
        and not previous.final
        and event.job_id == previous.job_id
        and event.epoch == previous.epoch
    )


def coalesce(batch: list[tuple[str, Event]], previous: dict[str, Delivery]) -> list[tuple[str, Event]]:
    """The events of one read to fan out, per the module's rule: the batch's order, less
    the progress that a newer event of the same run in the same read replaces.

    `previous` (channel -> its last event seen) is read and brought up to date.
    """
    out: list[tuple[str, Event] | None] = []
    runs: dict[str, int] = {}  # channel -> index in `out` of its progress this read may replace
    for channel, item in batch:
        if isinstance(item, Coalesced):
            event, carried = item.delivery, item.skipped
        else:
            event, carried = item, 0
        before = previous.get(channel)
        previous[channel] = event
        if before is None or not continues(before, event, carried):
            runs.pop(channel, None)  # a transition, or not known to be progress: kept
            out.append((channel, item))
            continue
        at = runs.get(channel)
        if at is not None:
            replaced = out[at]
            assert replaced is not None
            out[at] = None
            older = replaced[1]
            carried += 1 + (older.skipped if isinstance(older, Coalesced) else 0)
            item = Coalesced(event, carried)
        runs[channel] = len(out)
        out.append((channel, item))
    return [entry for entry in out if entry is not None]


def runs(items: list[Event]) -> list[Event | Run]:
    """One channel's events of a read (in order, after `coalesce`), with every stretch of
    two or more that one write can carry joined into a `Run`: each event starts where the
    one before ended (a `Coalesced` one in the same state), same job and epoch, none
    final. The rest stay as they are, in their places."""
    out: list[Event | Run] = []
    stretch: list[Event] = []
    for item in items:
        if (item.delivery if type(item) is Coalesced else item).final:
            _flush(stretch, out)  # it ends a stream: it goes alone, and nothing follows it
            stretch = []
            out.append(item)
        elif stretch and _follows(stretch[-1], item):
            stretch.append(item)
        else:
            _flush(stretch, out)
            stretch = [item]
    _flush(stretch, out)
    return out


def _follows(before: Event, item: Event) -> bool:
    prior = before.delivery if type(before) is Coalesced else before
    if type(item) is Coalesced:
        event, start = item.delivery, item.delivery.seq - item.skipped
        if event.state != prior.state:  # (a stand-in is progress: its state goes on)
            return False
    else:
        event, start = item, item.seq
    return start == prior.seq + 1 and event.job_id == prior.job_id and event.epoch == prior.epoch


def _flush(stretch: list[Event], out: list[Event | Run]) -> None:
    if len(stretch) > 1:
        out.append(Run(tuple(stretch)))
    else:
        out.extend(stretch)
