"""Watchers in step ride their job's lane (`jobwire.lanes`): the hub writes each next event
to all of them in one loop, without their stream cores. The promise: every client gets,
byte for byte, what its own core would have sent it, and its core's position is right
whenever it is read.

Checked with no Redis and no sockets: Hypothesis runs the same traffic through a hub with
lanes and through plain cores (each event to each core, as before lanes), with clients
starting at different seqs, sockets that stop and start taking writes, control messages,
sends, gaps that need history, new epochs, progress the hub coalesced, runs, outages,
resyncs and final events; then examples of each way on and off a lane. A whole server's
fan-out runs on lanes in every websocket test (tests/test_fanout.py and the rest)."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from jobwire.lanes import Lane
from jobwire.protocol import Keys
from jobwire.server.events import Coalesced, Delivery, Outage, Resync, Run
from jobwire.server.hub import Hub
from jobwire.stream import ClientStream

KEYS = Keys("jobwire:")
CHANNEL = KEYS.job_channel("a")


def event(seq: int, state: str, *, final: bool = False, epoch: str = "e1") -> Delivery:
    doc = {"job_id": "a", "seq": seq, "epoch": epoch, "state": state, "final": final, "p": seq}
    return Delivery.parse(orjson.dumps(doc))


@dataclass
class Page:
    epoch: str | None
    seq: int
    events: list[Delivery]
    lost: int = 0


@dataclass
class Socket:
    """Takes writes while `open`; what it took, in order."""

    open: bool = True
    bytes: bytearray = field(default_factory=bytearray)

    def write(self, frames: bytes, n: int) -> bool:
        if self.open:
            self.bytes += frames
        return self.open


def wire(item: object) -> bytes:
    if isinstance(item, Delivery | Coalesced):
        return item.ws_frame
    return orjson.dumps(item)


class World:
    """Clients of job "a" and the history they read; `lanes`: through a hub with lanes,
    else each item to each core directly."""

    def __init__(self, starts: list[int], history: list[Delivery], lanes: bool) -> None:
        self.history = history  # shared with the other world: the same truth
        self.cores: list[ClientStream] = []
        self.sockets: list[Socket] = []
        self.lanes = lanes
        self.hub = Hub("redis://unused")
        for since in starts:
            core = ClientStream(KEYS, queue_limit=8, max_bytes=1 << 30)
            core.begin("a", since, "e1")
            socket = Socket()
            core.write_now = socket.write
            self.cores.append(core)
            self.sockets.append(socket)
        self.hub._sinks = {CHANNEL: Lane({core.live for core in self.cores})}  # type: ignore[arg-type]

    def live(self, item: object) -> None:
        if self.lanes:
            self.hub._fan_out(CHANNEL, item)  # type: ignore[arg-type]
        else:
            for core in self.cores:
                if core.live in self.hub._sinks[CHANNEL]:
                    core.live(item)  # type: ignore[arg-type]
        for core in self.cores:
            if core.effects:  # a final event: the feed unsubscribes
                core.effects = []
                self.hub._sinks[CHANNEL].discard(core.live)  # type: ignore[arg-type]  # (hub.unsubscribe's part)

    def page(self, since: int) -> Page:
        epoch = self.history[-1].epoch if self.history else "e1"
        return Page(
            epoch, self.history[-1].seq if self.history else 0, [e for e in self.history if e.seq > since]
        )

    def drain(self, i: int, sending: bool) -> None:
        """Client i's writer: a send of what waits (the socket open), history read for a
        gap; `sending`: the transport marks the send as the feed does."""
        core, socket = self.cores[i], self.sockets[i]
        if sending:
            core.land()
            core.sending = True
        for _ in range(200):
            if not socket.open:
                break
            item = core.pop()
            if item is not None:
                socket.bytes += wire(item)
                continue
            need = core.need()
            if need is None:
                if not core.queued:
                    break
                continue
            for job in [need] if isinstance(need, str) else need:
                core.land()
                since = core.last.get(job, 0)
                page = self.page(since)
                if core.page(job, since, page):  # type: ignore[arg-type]
                    core.reset(job, page.epoch)
                    core.advance(job, self.page(0))  # type: ignore[arg-type]
        core.sending = False

    def seen(self) -> list[tuple[bytes, int | None]]:
        out = []
        for core, socket in zip(self.cores, self.sockets, strict=True):
            core.land()
            out.append((bytes(socket.bytes), core.last.get("a")))
        return out


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("next"), st.sampled_from(["progress", "progress", "progress", "state", "final"])),
        st.tuples(st.just("gap"), st.integers(2, 3)),
        st.tuples(st.just("epoch"), st.just(0)),
        st.tuples(st.just("coalesced"), st.integers(1, 3)),
        st.tuples(st.just("run"), st.integers(2, 4)),
        st.tuples(st.just("outage"), st.just(0)),
        st.tuples(st.just("socket"), st.integers(0, 2)),
        st.tuples(st.just("post"), st.integers(0, 2)),
        st.tuples(st.just("drain"), st.integers(0, 5)),
    ),
    max_size=50,
)


@given(st.lists(st.integers(0, 3), min_size=3, max_size=3), STEPS)
@settings(max_examples=400, deadline=None)
def test_riders_get_byte_for_byte_what_their_cores_would_have_sent(
    starts: list[int], steps: list[tuple[str, int | str]]
) -> None:
    history = [event(n, "S0") for n in range(1, 4)]  # seqs 1..3 happened before the clients came
    worlds = [World(starts, history, lanes=True), World(starts, history, lanes=False)]
    state, epoch, ended = 0, "e1", False

    def publish(e: Delivery, *, live: bool = True) -> None:
        history.append(e)
        if live:
            for world in worlds:
                world.live(e)

    for kind, arg in steps:
        seq = history[-1].seq if history else 0
        if kind in ("next", "gap", "coalesced", "run") and ended:
            continue
        if kind == "next":
            state += arg == "state"
            publish(event(seq + 1, f"S{state}", final=arg == "final", epoch=epoch))
            ended = arg == "final"
        elif kind == "gap":  # lost on the way: live from seq + arg
            for n in range(1, int(arg)):
                publish(event(seq + n, f"S{state}", epoch=epoch), live=False)
            publish(event(seq + int(arg), f"S{state}", epoch=epoch))
        elif kind == "epoch":  # the job's history lost and begun again
            epoch = f"e{int(epoch[1:]) + 1}"
            history.clear()
            state, ended = state + 1, False
            publish(event(1, f"S{state}", epoch=epoch))
        elif kind == "coalesced":  # the hub, behind, coalesced progress of the state
            for n in range(1, int(arg) + 1):
                publish(event(seq + n, f"S{state}", epoch=epoch), live=False)
            stand_in = Coalesced(history[-1], int(arg) - 1)
            for world in worlds:
                world.live(stand_in)
        elif kind == "run":  # the hub, behind, joined a run
            items = []
            for n in range(1, int(arg) + 1):
                state += n == 2
                publish(event(seq + n, f"S{state}", epoch=epoch), live=False)
                items.append(history[-1])
            for world in worlds:
                world.live(Run(tuple(items)))
        elif kind == "outage":
            for world in worlds:
                world.live(Outage(CHANNEL))
                world.live(Resync(CHANNEL))
        elif kind == "socket":
            for world in worlds:
                world.sockets[int(arg)].open = not world.sockets[int(arg)].open
        elif kind == "post":
            for world in worlds:
                world.cores[int(arg)].post({"type": "pong"})
        elif kind == "drain":
            for world in worlds:
                world.drain(int(arg) % 3, sending=int(arg) >= 3)
    for world in worlds:
        for socket in world.sockets:
            socket.open = True
        for i in range(3):
            world.drain(i, sending=False)
    lanes, plain = worlds
    assert lanes.seen() == plain.seen()


# -- on and off, by example -------------------------------------------------------------------


def test_watchers_in_step_board_and_the_next_event_is_written_by_the_lane_alone() -> None:
    world = World([3, 3, 2], [event(n, "S0") for n in range(1, 4)], lanes=True)
    lane = world.hub._sinks[CHANNEL]
    world.live(event(4, "S0"))
    assert len(lane.riders) == 2 and len(lane.walkers) == 1  # the third had a gap (3 missing)
    world.live(event(5, "S0"))
    # The riders' cores were not called: their own positions still say 4, the lane's 5.
    assert [core.last["a"] for core in world.cores[:2]] == [4, 4] and lane.seq == 5
    assert [s.bytes.count(b'"seq":5') for s in world.sockets] == [1, 1, 0]
    world.cores[0].land()
    assert world.cores[0].last["a"] == 5


def test_a_rider_whose_socket_stops_taking_lands_before_the_event_and_queues_it() -> None:
    world = World([3, 3], [event(n, "S0") for n in range(1, 4)], lanes=True)
    world.live(event(4, "S0"))
    lane = world.hub._sinks[CHANNEL]
    assert len(lane.riders) == 2
    world.sockets[0].open = False
    world.live(event(5, "S1"))
    assert len(lane.riders) == 1 and world.cores[0].queued and not world.cores[0].riding
    assert world.cores[0].last["a"] == 5 and world.cores[0].pop() == event(5, "S1")


def test_a_core_lands_before_it_queues_sends_or_is_read() -> None:
    for trigger in (
        lambda core: core.post({"type": "pong"}),
        lambda core: core.mark_too_slow("gone"),
        lambda core: core.page("a", 4, Page("e1", 4, [])),
        lambda core: core.advance("a", Page("e1", 4, [])),
        lambda core: core.end("a"),
    ):
        world = World([3], [event(n, "S0") for n in range(1, 4)], lanes=True)
        core, lane = world.cores[0], world.hub._sinks[CHANNEL]
        world.live(event(4, "S0"))
        world.live(event(5, "S0"))
        assert lane.riders and core.riding and core.last["a"] == 4  # (the lane's: 5)
        trigger(core)
        assert not lane.riders and not core.riding
        assert core.last.get("a", 5) == 5


def test_anything_but_what_continues_the_riders_lands_every_rider_first() -> None:
    for item in (
        event(6, "S0"),  # a gap
        event(5, "S0", epoch="e2"),  # another epoch
        event(5, "DONE", final=True),  # a final event: the cores end their streams
        Coalesced(event(7, "S0"), 1),  # stands for 6..7: 5 is missing
        Coalesced(event(6, "S1"), 1),  # progress in another state than the riders'
        Run((event(6, "S0"), event(7, "S1"))),  # 5 is missing
        Outage(CHANNEL),
    ):
        world = World([3, 3], [event(n, "S0") for n in range(1, 4)], lanes=True)
        world.live(event(4, "S0"))
        lane = world.hub._sinks[CHANNEL]
        assert len(lane.riders) == 2
        world.live(item)
        assert not lane.riders and all(core.last["a"] >= 4 for core in world.cores), item


def test_coalesced_progress_and_runs_that_continue_the_riders_are_carried() -> None:
    """A hub behind on its input hands on progress it coalesced and runs: those that start
    where the riders are go to them in the lane's loop, as their cores would write them
    (a stand-in's shared frame, a run's joined frames), and the riders stay on."""
    world = World([3, 3], [event(n, "S0") for n in range(1, 4)], lanes=True)
    world.live(event(4, "S0"))
    lane = world.hub._sinks[CHANNEL]
    stand_in = Coalesced(event(6, "S0"), 1)  # 5..6
    run = Run((event(7, "S0"), event(8, "S1"), event(9, "S1")))
    for item in (stand_in, run):
        world.live(item)
        assert len(lane.riders) == 2, item
    assert (lane.seq, lane.state) == (9, "S1")
    expected = event(4, "S0").ws_frame + stand_in.ws_frame + run.ws_frames
    assert [bytes(s.bytes) for s in world.sockets] == [expected, expected]
    world.live(event(10, "DONE", final=True))
    assert not lane.riders and [core.last["a"] for core in world.cores] == [10, 10]
