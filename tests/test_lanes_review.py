"""Review of 0febe97 (lanes): the same promise as tests/test_lanes.py, held against more of
the server than that test's model drives.

tests/test_lanes.py runs one job's traffic through bare cores, marks a send by landing the
core itself and setting `sending`, and reads history with its own loop. Here every client
is a real `server.feed.Feed` (its `write_now` and `sending_since` setters, `watch`,
`unwatch`, `watch_all`, `post`, `mark_too_slow`, `_backfill` and `_reset`), over a store
that answers at once (so the feed's coroutines finish without an event loop), and:

- each client watches two jobs (a core rides two lanes at once), and one also the all-jobs
  stream (its events come between the jobs' events, on a channel of their own);
- one client is a single-job websocket's (`write_finals = False`: finals are queued);
- one has a small byte budget (it goes `too_slow` and its feed closes), and any may be
  found stalled (an unanswered ping) while it rides;
- a send blocks for a while (`sending_since` set, live events queue meanwhile) and ends,
  among them an idle writer's heartbeat sent while the client rides;
- the transport's writer is swapped mid-stream, or taken away (the ASGI path only);
- clients unwatch a job and watch it again from another seq (claimed epoch or none);
- a channel is released and adopted again (a Cluster slot moving), with its resync;
- outages and resyncs, gaps, new epochs, hub-coalesced progress and runs, per job.

The same steps run through a hub with lanes and through the hub as it was before lanes
(each item to every subscriber's sink, no boarding). After every step each client's socket
bytes, its heartbeat skip (`_handed_on`), what it has queued and whether it is too slow
must be the same in both; at the end, after every socket drained, its positions too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobwire.lanes import Lane
from jobwire.protocol import Keys
from jobwire.server.auth import Principal
from jobwire.server.events import Coalesced, Delivery, Outage, Resync, Run
from jobwire.server.feed import Feed
from jobwire.server.hub import Hub
from jobwire.server.render import ws_bytes
from jobwire.server.store import Stream
from tests.test_lanes import Socket

KEYS = Keys("jobwire:")
JOBS = ("a", "b")
ALL = KEYS.all_channel
ADMIN = Principal("review", None, admin=True)


class _Confirmed:
    """A channel's confirmation, already in (what the hub asks of its `_ready` futures)."""

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False


def done() -> asyncio.Future[None]:
    return _Confirmed()  # type: ignore[return-value]


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a feed coroutine that never suspends (the store answers at once)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine waited: the test's store or hub suspended")


def event(job: str, seq: int, state: str, epoch: str, *, final: bool = False) -> Delivery:
    doc = {"job_id": job, "seq": seq, "epoch": epoch, "state": state, "final": final, "p": seq}
    return Delivery.parse(orjson.dumps(doc))


@dataclass
class Job:
    """One job's truth: its epoch and its history (shared by both worlds)."""

    name: str
    epoch: str = "e1"
    state: int = 0
    ended: bool = False
    history: list[Delivery] = field(default_factory=list)

    @property
    def seq(self) -> int:
        return self.history[-1].seq if self.history else 0


class Store:
    """`JobStore.events_since` over the shared truth, answering without a wait."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self.jobs = jobs
        #: Run once, after the next read is taken and before its answer is handed back:
        #: live events that arrive while a watch's read is on its way.
        self.during: Callable[[], None] | None = None

    async def events_since(self, job_id: str, since: int, principal: Principal) -> Stream | None:
        job = self.jobs[job_id]
        page = Stream(job.epoch, job.seq, [e for e in job.history if e.seq > since])
        during, self.during = self.during, None
        if during is not None:
            during()
        return page


def heartbeat_message() -> dict[str, Any]:
    return {"type": "heartbeat"}


def _bystander(item: object) -> None:
    """A subscriber that is no stream core (keeps each channel's lane alive)."""


class World:
    """Three clients' feeds on one hub; `lanes`: the hub's own fan-out, else the fan-out
    as before lanes (each item to every sink, nothing boards)."""

    def __init__(self, jobs: dict[str, Job], starts: list[int], lanes: bool) -> None:
        self.lanes = lanes
        self.hub = Hub("redis://unused")
        for channel in (*(KEYS.job_channel(j) for j in JOBS), ALL):
            self.hub._sinks[channel] = Lane({_bystander})  # type: ignore[arg-type]
            self.hub._ready[channel] = done()
        self.store = Store(jobs)
        self.jobs = jobs
        self.feeds: list[Feed] = []
        self.sockets: list[Socket] = []
        self.held: list[Any] = [None, None, None]  # an item in a blocked send
        for i, since in enumerate(starts):
            feed = Feed(
                self.hub,  # type: ignore[arg-type]
                self.store,  # type: ignore[arg-type]
                KEYS,
                ADMIN,
                queue_limit=6,
                max_jobs=8,
                max_bytes=1400 if i == 1 else 1 << 30,
            )
            socket = Socket()
            feed.write_now = socket.write
            if i == 2:
                feed.write_finals = False  # a single-job websocket's: the close follows the final
            for job in JOBS:
                assert run_sync(feed.watch(job, since, "e1"))
            if i == 0:
                run_sync(feed.watch_all())
            self.feeds.append(feed)
            self.sockets.append(socket)
        for i in range(len(starts)):
            self.drain(i)  # the replies and history the clients came for: now in step

    def fan_out(self, channel: str, item: object) -> None:
        if self.lanes:
            self.hub._fan_out(channel, item)  # type: ignore[arg-type]
        else:
            for sink in tuple(self.hub._sinks.get(channel, ())):
                sink(item)  # type: ignore[arg-type]

    def publish(self, job: str, item: object) -> None:
        self.fan_out(KEYS.job_channel(job), item)
        self.fan_out(ALL, item)

    def drain(self, i: int) -> None:
        """Client i's writer, as `pump` over `Feed.next` does, through the ASGI send (which
        waits until the client takes it, so it is not refused like a direct write)."""
        feed, socket = self.feeds[i], self.sockets[i]
        if self.held[i] is not None:
            self.end_send(i)
        core = feed.core
        for _ in range(400):
            item = core.pop()
            if item is None:
                needed = core.need()
                feed._perform()
                if isinstance(needed, str):
                    run_sync(feed._backfill(needed))
                elif needed is not None:
                    for job in needed:
                        run_sync(feed._backfill(job))
                elif core.queued:
                    continue
                else:
                    return
                continue
            feed.sending_since = 1.0  # (WebSocketTransport.write)
            socket.bytes += ws_bytes(item)
            feed.sending_since = None
        raise AssertionError("drain did not finish")

    def start_send(self, i: int, heartbeat: bool = False) -> None:
        """Client i's writer takes the next item (or, idle, a heartbeat) and blocks in its
        send."""
        feed = self.feeds[i]
        if self.held[i] is not None:
            return
        item = heartbeat_message() if heartbeat else feed.core.pop()
        if item is None:
            return
        feed.sending_since = 1.0
        self.held[i] = item

    def end_send(self, i: int) -> None:
        item, self.held[i] = self.held[i], None
        if item is not None:
            self.sockets[i].bytes += ws_bytes(item)
            self.feeds[i].sending_since = None

    def rewatch(self, i: int, job: str, since: int, claim: bool, during: tuple[Delivery, ...] = ()) -> None:
        """Client i watches `job` again from `since`; `during`: events published live while
        its history read is on its way (the sink is subscribed by then)."""
        feed = self.feeds[i]
        if feed.closing:
            return
        feed.unwatch(job)
        if during:
            self.store.during = lambda: [self.publish(job, e) for e in during]  # type: ignore[func-returns-value]
        # (The events during the read may make the client too slow: its feed closes, and
        # the watch ends quietly; test_a_watch_whose_feed_closes_during_its_read_does_not_raise.)
        run_sync(feed.watch(job, since, self.jobs[job].epoch if claim else None))
        self.store.during = None

    def move(self, job: str) -> None:
        """The job's channel moves away and back (`Hub.release`, `Hub.adopt`, resync)."""
        channel = KEYS.job_channel(job)
        moving = self.hub.release(channel)
        assert moving is not None
        self.hub._sinks[channel] = Lane(moving.sinks)
        self.hub._ready[channel] = done()
        self.fan_out(channel, Resync(channel))

    def observed(self) -> list[tuple[bytes, int, bool, str | None]]:
        return [
            (bytes(s.bytes), f._handed_on(), f.core.queued, f.core.too_slow)
            for f, s in zip(self.feeds, self.sockets, strict=True)
        ]

    def positions(self) -> list[tuple[dict[str, int], dict[str, str], dict[str, str | None]]]:
        out = []
        for feed in self.feeds:
            feed.core.land()
            out.append((dict(feed.core.last), dict(feed.core._state), dict(feed.core.epoch)))
        return out


JOB = st.sampled_from(JOBS)
CLIENT = st.integers(0, 2)
ARGS: dict[str, Any] = {
    "next": st.tuples(JOB, st.sampled_from(["progress"] * 6 + ["state", "final"])),
    "gap": st.tuples(JOB, st.integers(2, 3)),
    "epoch": st.tuples(JOB),
    "coalesced": st.tuples(JOB, st.integers(1, 3)),
    "run": st.tuples(JOB, st.integers(2, 4)),
    "outage": st.tuples(JOB),
    "move": st.tuples(JOB),
    "socket": st.tuples(CLIENT),
    "post": st.tuples(CLIENT),
    "drain": st.tuples(CLIENT),
    "send": st.tuples(CLIENT),
    "sent": st.tuples(CLIENT),
    "heartbeat": st.tuples(CLIENT),
    "stall": st.tuples(CLIENT),
    "swap": st.tuples(CLIENT, st.booleans()),
    "rewatch": st.tuples(CLIENT, JOB, st.integers(0, 6), st.booleans()),
    # the same, with events published while its read is on its way (after it was taken or
    # before), with the client asking from the job's last seq (as on a reconnect) or before
    "race": st.tuples(CLIENT, JOB, st.integers(0, 2), st.booleans(), st.integers(1, 3), st.booleans()),
}
#: Mostly the next event (so watchers get in step and ride), among everything else.
KINDS = (
    ["next"] * 16 + ["drain"] * 3 + ["race"] * 2 + [kind for kind in ARGS if kind not in ("next", "drain")]
)
STEP = st.sampled_from(KINDS).flatmap(lambda kind: ARGS[kind].map(lambda args: (kind, *args)))
STEPS = st.lists(STEP, min_size=10, max_size=80)


@given(st.lists(st.integers(0, 3), min_size=3, max_size=3), STEPS)
@settings(max_examples=300, deadline=None)
def test_feeds_on_lanes_send_what_they_sent_before_lanes(
    starts: list[int], steps: list[tuple[Any, ...]]
) -> None:
    jobs = {name: Job(name) for name in JOBS}
    for job in jobs.values():  # seqs 1..3 happened before the clients came
        job.history = [event(job.name, n, "S0", "e1") for n in range(1, 4)]
    worlds = [World(jobs, starts, lanes=True), World(jobs, starts, lanes=False)]
    lanes, plain = worlds

    def append(job: Job, state: str, *, final: bool = False) -> Delivery:
        e = event(job.name, job.seq + 1, state, job.epoch, final=final)
        job.history.append(e)
        return e

    for number, (kind, *args) in enumerate(steps):
        if kind in ("next", "gap", "coalesced", "run") and jobs[args[0]].ended:
            continue
        if kind == "next":
            job = jobs[args[0]]
            job.state += args[1] == "state"
            e = append(job, f"S{job.state}", final=args[1] == "final")
            job.ended = e.final
            for w in worlds:
                w.publish(job.name, e)
        elif kind == "gap":  # lost on the way
            job = jobs[args[0]]
            for _ in range(args[1] - 1):
                append(job, f"S{job.state}")
            e = append(job, f"S{job.state}")
            for w in worlds:
                w.publish(job.name, e)
        elif kind == "epoch":  # history lost and begun again
            job = jobs[args[0]]
            job.epoch = f"e{int(job.epoch[1:]) + 1}"
            job.history.clear()
            job.state, job.ended = job.state + 1, False
            e = append(job, f"S{job.state}")
            for w in worlds:
                w.publish(job.name, e)
        elif kind == "coalesced":  # the hub, behind, coalesced progress
            job = jobs[args[0]]
            for _ in range(args[1]):
                append(job, f"S{job.state}")
            stand_in = Coalesced(job.history[-1], args[1] - 1)
            for w in worlds:
                w.publish(job.name, stand_in)
        elif kind == "run":  # the hub, behind, joined a run
            job = jobs[args[0]]
            items = []
            for n in range(args[1]):
                job.state += n == 1
                items.append(append(job, f"S{job.state}"))
            for w in worlds:
                w.publish(job.name, Run(tuple(items)))
        elif kind == "outage":
            channel = KEYS.job_channel(args[0])
            for w in worlds:
                w.fan_out(channel, Outage(channel))
                w.fan_out(channel, Resync(channel))
        elif kind == "move":
            for w in worlds:
                w.move(args[0])
        elif kind == "socket":
            for w in worlds:
                w.sockets[args[0]].open = not w.sockets[args[0]].open
        elif kind == "post":
            for w in worlds:
                if not w.feeds[args[0]].closing:
                    w.feeds[args[0]].post({"type": "pong"})
        elif kind == "drain":
            for w in worlds:
                w.drain(args[0])
        elif kind == "send":
            for w in worlds:
                w.start_send(args[0])
        elif kind == "sent":
            for w in worlds:
                w.end_send(args[0])
        elif kind == "stall":  # `StallWatch`: its keepalive ping went unanswered (no send)
            for w in worlds:
                w.feeds[args[0]].mark_too_slow("client too slow: answered no ping for 30s; resume by seq")
        elif kind == "heartbeat":  # an idle writer's keepalive, blocked in its send
            for w in worlds:
                w.start_send(args[0], heartbeat=True)
        elif kind == "swap":  # another writer of the socket, or none (the ASGI path only)
            for w in worlds:
                socket = w.sockets[args[0]]
                w.feeds[args[0]].write_now = functools.partial(Socket.write, socket) if args[1] else None
        elif kind == "rewatch":
            for w in worlds:
                w.rewatch(args[0], args[1], args[2], args[3])
        elif kind == "race":
            i, name, back, claim, count, taken_first = args
            job = jobs[name]
            if job.ended:
                continue
            since = max(job.seq - back, 0)
            fresh = [event(name, job.seq + n, f"S{job.state}", job.epoch) for n in range(1, count + 1)]
            if not taken_first:  # published before the read was taken: in it, and live
                job.history.extend(fresh)
            for w in worlds:
                w.rewatch(i, name, since, claim, tuple(fresh))
            if taken_first:  # published after the read was taken: live only
                job.history.extend(fresh)
        assert lanes.observed() == plain.observed(), (number, kind, args)

    for w in worlds:
        for i in range(3):
            w.sockets[i].open = True
            w.drain(i)
    assert lanes.observed() == plain.observed()
    assert lanes.positions() == plain.positions()


# -- found on the way, not the lanes' (the same with lanes and without), now fixed --------------


@pytest.mark.parametrize("lanes", [True, False])
def test_a_resume_from_the_head_is_not_reset_by_an_event_that_comes_during_its_read(lanes: bool) -> None:
    """A client resumes job "a" from its head (seq 3, epoch e1, as on a reconnect); event 4
    is published after the history read was taken and reaches the hub before the read's
    answer. It should get event 4 once and no reset: nothing of its history was lost."""
    jobs = {name: Job(name, history=[event(name, n, "S0", "e1") for n in range(1, 4)]) for name in JOBS}
    world = World(jobs, [3, 3, 3], lanes=lanes)
    socket = world.sockets[0]
    before = len(socket.bytes)
    fresh = [event("a", 4, "S0", "e1")]
    world.rewatch(0, "a", 3, True, tuple(fresh))
    jobs["a"].history.extend(fresh)
    world.drain(0)
    sent = bytes(socket.bytes[before:])
    assert b'"type":"reset"' not in sent
    assert sent.count(b'"type":"event","job_id":"a","seq":4,') == 1


def test_a_watch_whose_feed_closes_during_its_read_does_not_raise() -> None:
    """The client is found stalled (`StallWatch`: an unanswered ping; or its byte budget
    runs out on the live events) while its watch's history read is on its way: its feed
    closes (every job unwatched). The watch should end quietly, not raise into the
    connection's handler."""
    jobs = {name: Job(name, history=[event(name, n, "S0", "e1") for n in range(1, 4)]) for name in JOBS}
    world = World(jobs, [3, 3, 3], lanes=True)
    feed = world.feeds[0]
    feed.unwatch("a")
    world.store.during = lambda: feed.mark_too_slow("client too slow: answered no ping for 30s")
    run_sync(feed.watch("a", 3, "e1"))
    assert feed.closing and "a" not in feed.core.last
