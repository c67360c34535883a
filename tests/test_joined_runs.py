"""A hub behind on its input writes what a read keeps of a job to each watcher in step in
one write (`server.backlog.runs`, `events.Run`, `ClientStream.live`).

The cut into runs is checked by example and by Hypothesis over any traffic cut into any
reads (the same traffic as `tests/test_overload.py`'s); the stream core is checked to
send, byte for byte, what it would have sent had the run come event by event, whatever
the client had before and whether or not its socket takes writes. The whole server
behind on its input is `tests/test_overload.py`'s (it counts `jobwire_input_joined`)."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from jobwire.lanes import Lane
from jobwire.protocol import Keys
from jobwire.server.backlog import Event, coalesce, runs
from jobwire.server.events import Coalesced, Delivery, Run
from jobwire.stream import ClientStream
from tests.test_overload import event, reads, traffic


def flat(pieces: list[Event | Run]) -> list[Event]:
    out: list[Event] = []
    for piece in pieces:
        out.extend(piece.items if isinstance(piece, Run) else [piece])
    return out


def seqs(pieces: list[Event | Run]) -> list[object]:
    return [[seq_of(i) for i in p.items] if isinstance(p, Run) else seq_of(p) for p in pieces]


def seq_of(item: Event) -> int:
    return item.delivery.seq if isinstance(item, Coalesced) else item.seq


# -- the cut, by example ---------------------------------------------------------------------


def test_consecutive_events_of_a_job_make_one_run_and_a_final_one_goes_alone() -> None:
    items: list[Event] = [
        event("a", 1, "A"),
        event("a", 2, "B"),
        event("a", 3, "B"),
        event("a", 4, "DONE", final=True),
    ]
    pieces = runs(items)
    assert seqs(pieces) == [[1, 2, 3], 4]
    run = pieces[0]
    assert isinstance(run, Run)
    assert (run.first, run.seq, run.state, run.first_state) == (1, 3, "B", None)
    assert run.ws_frames == b"".join(i.ws_frame for i in items[:3])


def test_a_seq_that_does_not_follow_or_another_epoch_starts_a_new_run() -> None:
    items: list[Event] = [
        event("a", 1, "A"),
        event("a", 2, "A"),
        event("a", 4, "A"),  # 3 was lost on the way
        event("a", 5, "B"),
        event("a", 6, "B", epoch="e2"),  # the job's history began again
        event("a", 7, "C", epoch="e2"),
    ]
    assert seqs(runs(items)) == [[1, 2], [4, 5], [6, 7]]


def test_a_stand_in_for_coalesced_progress_starts_where_its_run_began() -> None:
    stand_in = Coalesced(event("a", 9, "A"), 6)  # seqs 3..9, progress in A
    items: list[Event] = [event("a", 2, "A"), stand_in, event("a", 10, "B")]
    (run,) = runs(items)
    assert isinstance(run, Run) and run.first == 2 and run.seq == 10
    head = runs([stand_in, event("a", 10, "B")])[0]
    assert isinstance(head, Run) and (head.first, head.first_state) == (3, "A")
    # A stand-in in another state than the event before it is no continuation of it.
    assert seqs(runs([event("a", 2, "B"), stand_in])) == [2, 9]


def test_one_event_and_nothing_are_left_as_they_are() -> None:
    assert runs([]) == []
    single = event("a", 1, "A")
    assert runs([single]) == [single]


# -- the cut, by Hypothesis ------------------------------------------------------------------


def kept_per_channel(messages: list[tuple[str, Delivery]], cuts: list[int]) -> list[tuple[str, list[Event]]]:
    """What each read keeps of each channel, as the hub hands it to `runs`."""
    previous: dict[str, Delivery] = {}
    out: list[tuple[str, list[Event]]] = []
    for batch in reads(messages, cuts):
        per: dict[str, list[Event]] = {}
        for channel, item in coalesce(batch, previous):
            per.setdefault(channel, []).append(item)
        out += per.items()
    return out


@given(traffic())
@settings(max_examples=300, deadline=None)
def test_runs_keep_every_event_in_place_and_each_run_is_one_unbroken_stretch(
    drawn: tuple[list[tuple[str, Delivery]], list[int]],
) -> None:
    for _, items in kept_per_channel(*drawn):
        pieces = runs(items)
        assert flat(pieces) == items  # nothing lost, added or moved
        for piece in pieces:
            if not isinstance(piece, Run):
                continue
            events = [i.delivery if isinstance(i, Coalesced) else i for i in piece.items]
            assert len(events) > 1 and not any(e.final for e in events)
            assert len({(e.job_id, e.epoch) for e in events}) == 1
            for before, item in zip(piece.items, piece.items[1:], strict=False):
                start = item.delivery.seq - item.skipped if isinstance(item, Coalesced) else item.seq
                assert start == seq_of(before) + 1
        for before, after in zip(pieces, pieces[1:], strict=False):  # each run as long as it goes
            if isinstance(before, Run) and not isinstance(after, Run):
                event = after.delivery if isinstance(after, Coalesced) else after
                start = event.seq - after.skipped if isinstance(after, Coalesced) else event.seq
                assert (
                    event.final
                    or start != before.seq + 1
                    or (event.job_id, event.epoch) != (before.job_id, before.epoch)
                    or (isinstance(after, Coalesced) and event.state != before.state)
                ), (before, after)


# -- the stream core: joined or not, the same bytes ------------------------------------------


class Socket:
    """A socket that takes writes while `open`, recording the bytes."""

    def __init__(self) -> None:
        self.open = True
        self.bytes = bytearray()
        self.writes = 0

    def write(self, frames: bytes, n: int) -> bool:
        if not self.open:
            return False
        self.bytes += frames
        self.writes += 1
        return True


def wire(item: object) -> bytes:
    """A queued item as the writer would send it."""
    if isinstance(item, Delivery | Coalesced):
        return item.ws_frame
    return orjson.dumps(item)


def drain(core: ClientStream, socket: Socket) -> None:
    """The writer: what waits goes out (to a socket that takes it) and the inbox is worked
    through; history is never read here (a gap leaves the inbox waiting)."""
    while core.queued and socket.open:
        item = core.pop()
        if item is None:
            if core.need() is not None:
                return
            continue
        socket.bytes += wire(item)


@given(traffic(), st.data())
@settings(max_examples=300, deadline=None)
def test_a_run_sends_the_bytes_its_events_would_have_sent(
    drawn: tuple[list[tuple[str, Delivery]], list[int]], data: st.DataObject
) -> None:
    """Two clients of job "a" from the same `since`: one gets the hub's runs, the other
    the same events one by one; their sockets take writes or not, alike, read by read.
    They end with the same bytes sent, the same seq, and the same queue."""
    since = data.draw(st.integers(0, 8))
    keys = Keys("jobwire:")
    clients = []
    for _ in range(2):
        core = ClientStream(keys, queue_limit=1000, max_bytes=1 << 30)
        core.begin("a", since, "e1")
        socket = Socket()
        core.write_now = socket.write
        clients.append((core, socket))
    (joined, joined_socket), (apart, apart_socket) = clients
    for channel, items in kept_per_channel(*drawn):
        if channel != "a":
            continue  # job "a"'s channel only (the shared one's runs are unpacked before the core)
        writable = data.draw(st.booleans())
        joined_socket.open = apart_socket.open = writable
        for piece in runs(items):
            joined.live(piece)
        for item in items:
            apart.live(item)
        if data.draw(st.booleans()):
            joined_socket.open = apart_socket.open = True
            drain(joined, joined_socket)
            drain(apart, apart_socket)
    assert bytes(joined_socket.bytes) == bytes(apart_socket.bytes)
    assert joined.last == apart.last
    assert [wire(i) for i in _rest(joined)] == [wire(i) for i in _rest(apart)]
    assert joined_socket.writes <= apart_socket.writes


def _rest(core: ClientStream) -> list[object]:
    out = []
    while (item := core.pop()) is not None:
        out.append(item)
    return out


def test_a_client_in_step_takes_a_run_in_one_write_and_one_behind_event_by_event() -> None:
    keys = Keys("jobwire:")
    items: list[Event] = [event("a", n, "A" if n < 3 else "B") for n in range(2, 6)]
    (run,) = runs(items)
    in_step, behind = (
        ClientStream(keys, queue_limit=10, max_bytes=1 << 20),
        ClientStream(keys, queue_limit=10, max_bytes=1 << 20),
    )
    in_step.begin("a", 1, "e1")
    behind.begin("a", 3, "e1")  # had 2 and 3 from history: takes 4 and 5 alone
    sockets = []
    for core in (in_step, behind):
        socket = Socket()
        core.write_now = socket.write
        sockets.append(socket)
        core.live(run)
    assert sockets[0].writes == 1 and bytes(sockets[0].bytes) == run.ws_frames
    assert sockets[1].writes == 2 and bytes(sockets[1].bytes) == items[2].ws_frame + items[3].ws_frame
    assert in_step.last == behind.last == {"a": 5}


# -- the stream rules under the hub's real cut (review of the joined writes) -----------------


def _frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked text frames joined in `data` (a direct write)."""
    out, at = [], 0
    while at < len(data):
        n = data[at + 1] & 0x7F
        head = 2 + (2 if n == 126 else 8 if n == 127 else 0)
        if n == 126:
            n = int.from_bytes(data[at + 2 : at + 4], "big")
        elif n == 127:
            n = int.from_bytes(data[at + 2 : at + 10], "big")
        out.append(data[at + head : at + head + n])
        at += head + n
    return out


def test_the_stream_rules_hold_when_the_hub_hands_on_runs() -> None:
    """`tests/test_stream.py`'s state machine, its hub reading as `Hub._fan_out_batch` does
    (kept items per channel, cut into runs), its client parsing every frame of a joined
    write: every rule it checks still holds."""
    from hypothesis import HealthCheck
    from hypothesis.stateful import run_state_machine_as_test

    from jobwire.server.hub import Hub
    from tests import test_stream

    class JoinedClient(test_stream.Client):
        def frame(self, frame: bytes, count: int) -> bool:
            payloads = _frames(frame)
            assert len(payloads) == count, (len(payloads), count)
            for payload in payloads:
                doc = orjson.loads(payload)
                self.add(
                    Delivery.parse(orjson.dumps({k: v for k, v in doc.items() if k != "type"})),
                    doc.get("coalesced", 0),
                )
            return True

    class JoinedMachine(test_stream.StreamMachine):
        def __init__(self) -> None:
            super().__init__()
            self.client = JoinedClient()
            self.hub = Hub("redis://unused")
            self.hub._previous = self.previous

        @test_stream.rule(n=st.integers(1, 12))
        def hub_reads(self, n: int) -> None:
            batch = list(self.input[:n])
            del self.input[:n]
            channels = [channel for channel, _ in batch]
            if len(set(channels)) == len(channels):
                for _, item in batch:
                    self.live(item)
                return
            self.hub._sinks = {channel: Lane({self.live}) for channel in set(channels)}  # type: ignore[arg-type]
            self.hub._fan_out_batch(batch)

    run_state_machine_as_test(
        lambda: JoinedMachine(),
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_after_a_run_written_at_once_progress_of_its_last_state_queues_as_progress() -> None:
    """The state a run ends in is the client's (`_state`): progress after it, queued
    while the socket is full, shares one replaceable slot as it would have after the
    events one by one, and a transition after it keeps its own place."""
    keys = Keys("jobwire:")
    items: list[Event] = [event("a", 2, "A"), event("a", 3, "B")]
    (run,) = runs(items)
    later = [event("a", 4, "B"), event("a", 5, "B"), event("a", 6, "C"), event("a", 7, "C")]
    sent = []
    for joined in (True, False):
        core = ClientStream(keys, queue_limit=10, max_bytes=1 << 20)
        core.begin("a", 1, "e1")
        socket = Socket()
        core.write_now = socket.write
        for item in [run] if joined else items:
            core.live(item)
        socket.open = False
        for item in later:
            core.live(item)
        sent.append((bytes(socket.bytes), [wire(i) for i in _rest(core)], dict(core._state), dict(core.last)))
    assert sent[0] == sent[1]
    queued = sent[0][1]
    assert len(queued) == 3  # 4..5 as one (coalesced: 1), then 6 in its place, then 7
    assert b'"coalesced":1,' in queued[0]


def test_a_read_hands_on_events_of_several_jobs_in_the_order_they_were_published() -> None:
    """A client watching a group and its child: the child's final event, then the group's
    count of children done, published in that order (the recorder's second script call),
    reach it in that order: events are joined only where they are side by side in the
    read (grouped per channel, the client heard "2 done" before the child it watches was)."""
    from jobwire.server.hub import Hub

    hub = Hub("redis://unused")
    got: list[tuple[str, int]] = []
    hub._sinks = {
        "g": Lane({lambda item: got.extend((e.job_id, e.seq) for e in getattr(item, "items", (item,)))}),
        "c2": Lane({lambda item: got.append((item.job_id, item.seq))}),
    }
    batch: list[tuple[str, Event]] = [
        ("g", event("g", 3, "PROGRESS")),  # child 1 done
        ("c2", event("c2", 4, "SUCCESS", final=True)),
        ("g", event("g", 4, "PROGRESS")),  # child 2 done: published after c2's final event
    ]
    hub._fan_out_batch(batch)
    assert got == [("g", 3), ("c2", 4), ("g", 4)]


def test_a_run_from_a_stand_in_is_joined_only_for_a_client_at_the_seq_before_all_it_stands_for() -> None:
    """A run headed by progress the hub coalesced (5 standing for 3..5, then 6): a client
    that had 2 takes it joined (its `coalesced: 2` is the client's own count); one that had
    only 1 (2 was lost on the way) or had 3 must not, or it is told of too few events skipped
    or sent a seq twice. Each gets what the events one by one would have sent it."""
    keys = Keys("jobwire:")
    batch: list[tuple[str, Event]] = [("a", event("a", n, "A")) for n in (3, 4, 5)]
    batch.append(("a", event("a", 6, "B")))
    kept = coalesce(batch, {"a": event("a", 2, "A")})
    items = [item for _, item in kept]
    (run,) = runs(items)
    assert isinstance(items[0], Coalesced)
    for since, joined_write in ((2, True), (1, False), (3, False), (4, False)):
        sent = []
        for joined in (True, False):
            core = ClientStream(keys, queue_limit=10, max_bytes=1 << 20)
            core.begin("a", since, "e1")
            core._state["a"] = "A"
            socket = Socket()
            core.write_now = socket.write
            for item in [run] if joined else items:
                core.live(item)
            sent.append((bytes(socket.bytes), [wire(i) for i in _rest(core)], core.last, socket.writes))
        assert sent[0][:3] == sent[1][:3], since
        assert (sent[0][0] == run.ws_frames and sent[0][3] == 1) is joined_write, since


def test_the_all_jobs_streams_do_not_part_a_jobs_events() -> None:
    """Every event is published on its job's channel and on the all-jobs stream, so a read
    interleaves the two: the all-jobs stream's events (no part of a job's ordered stream)
    go out on their own and the job's events are still joined; a hub that is not told
    which channels are unordered keeps the read's order strictly."""
    from jobwire.server.hub import Hub

    batch: list[tuple[str, Event]] = []
    for n in (1, 2, 3):
        batch += [("a", event("a", n, f"S{n}")), ("all", event("a", n, f"S{n}"))]
    for unordered, joined in ((lambda ch: ch == "all", True), (None, False)):
        hub = Hub("redis://unused", unordered=unordered)
        got: dict[str, list[object]] = {"a": [], "all": []}
        hub._sinks = {ch: Lane({items.append}) for ch, items in got.items()}  # type: ignore[arg-type]
        hub._fan_out_batch(batch)
        if joined:
            (run,) = got["a"]
            assert isinstance(run, Run) and [seq_of(i) for i in run.items] == [1, 2, 3]
            assert hub.input_joined == 3
        else:
            assert [seq_of(i) for i in got["a"]] == [1, 2, 3]  # type: ignore[arg-type]
            assert hub.input_joined == 0
        assert [seq_of(i) for i in got["all"]] == [1, 2, 3]  # type: ignore[arg-type]
