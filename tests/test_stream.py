"""The stream core's rules, with no Redis and no sockets: a Hypothesis state machine drives
`ClientStream` through interleavings of live events, outages and resyncs, history reads,
a socket that takes or refuses direct writes, slow reading and byte limits, and a hub
that falls behind on its input and coalesces what each read brings (`server.backlog`);
plus the findings that shaped it, as explicit examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from jobwire.protocol import Keys, Msg
from jobwire.server.backlog import Event, coalesce
from jobwire.server.events import Coalesced, Delivery, FromAll, Outage, Resync
from jobwire.server.store import Stream
from jobwire.stream import CONTROL_BYTES, ClientStream, Item

KEYS = Keys("jobwire:")
JOBS = ("a", "b")


def event(job: str, seq: int, state: str, *, final: bool = False, epoch: str = "e1") -> Delivery:
    doc = {"job_id": job, "seq": seq, "epoch": epoch, "state": state, "final": final, "progress": {"n": seq}}
    return Delivery.parse(orjson.dumps(doc))


@dataclass
class Client:
    """What a client received, per job, as (seq, coalesced, state, final), plus gaps."""

    events: dict[str, list[tuple[int, int, str, bool]]] = field(default_factory=dict)
    gaps: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def take(self, item: Item) -> None:
        if isinstance(item, dict):
            if item["type"] == Msg.GAP:
                self.gaps.setdefault(item["job_id"], []).append((item["from"], item["to"]))
            return
        if isinstance(item, FromAll):
            return
        delivery, skipped = (item.delivery, item.skipped) if isinstance(item, Coalesced) else (item, 0)
        self.add(delivery, skipped)

    def add(self, d: Delivery, skipped: int) -> None:
        self.events.setdefault(d.job_id, []).append((d.seq, skipped, d.state, d.final))

    def frame(self, frame: bytes, _count: int) -> bool:
        """A direct write: the websocket frame's JSON payload."""
        n = frame[1] & 0x7F
        payload = frame[2 + (2 if n == 126 else 8 if n == 127 else 0) :]
        doc = orjson.loads(payload)
        self.add(
            Delivery.parse(orjson.dumps({k: v for k, v in doc.items() if k != "type"})),
            doc.get("coalesced", 0),
        )
        return True


def transitions(truth: list[Delivery]) -> list[int]:
    """The seqs that must be delivered: the first event of each state, and the final one."""
    return [e.seq for i, e in enumerate(truth) if i == 0 or e.final or truth[i - 1].state != e.state]


def check_order(client: Client) -> None:
    """Per job: seqs strictly rise, and every seq is delivered, counted in a `coalesced`,
    or announced as a gap."""
    for job, got in client.events.items():
        expected = got[0][0] - got[0][1]
        gaps = {frm: to for frm, to in client.gaps.get(job, [])}
        for seq, skipped, _, _ in got:
            if expected in gaps and seq > expected:
                expected = gaps[expected] + 1
            assert seq == expected + skipped, (job, got)
            expected = seq + 1


class StreamMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 700  # a handful of events: slow reading reaches it
        self.core = ClientStream(KEYS, queue_limit=6, max_bytes=self.max_bytes)
        self.client = Client()
        self.truth: dict[str, list[Delivery]] = {job: [] for job in JOBS}
        self.down: set[str] = set()  # jobs whose live channel is out (events not delivered)
        self.state: dict[str, int] = {job: 0 for job in JOBS}
        self.owed: set[str] = set()  # jobs with a live event lost: a resync is due
        self.in_flight: list[tuple[str, int, Stream]] = []  # history reads not landed yet
        # The hub's input: events published and not read yet, and what its coalescing
        # reads saw last per channel (see `Hub._on_replies`).
        self.input: list[tuple[str, Delivery]] = []
        self.previous: dict[str, Delivery] = {}
        for job in JOBS:
            self.truth[job].append(event(job, 1, "S0"))
            self.core.begin(job, 0, None)
            assert not self.core.first_page(job, self.page(job, 0), None)
            self.core.subscribed(job)

    def page(self, job: str, after: int) -> Stream:
        events = [e for e in self.truth[job] if e.seq > after]
        return Stream("e1", len(self.truth[job]), events)

    def ended(self, job: str) -> bool:
        return self.truth[job][-1].final

    # -- what happens -------------------------------------------------------------------

    @rule(
        job=st.sampled_from(JOBS),
        kinds=st.lists(
            st.sampled_from(["progress", "progress", "progress", "state", "final"]), min_size=1, max_size=5
        ),
        read=st.booleans(),
    )
    def publish(self, job: str, kinds: list[str], read: bool) -> None:
        """Events reach the hub's input; with `read`, the hub reads at once (what it has
        not read yet, and these), else they wait in the input (the hub is behind)."""
        for kind in kinds:
            if self.ended(job):
                break
            if kind == "state":
                self.state[job] += 1
            seq = len(self.truth[job]) + 1
            new = event(job, seq, f"S{self.state[job]}" if kind != "final" else "DONE", final=kind == "final")
            self.truth[job].append(new)
            if job not in self.down:
                self.input.append((KEYS.job_channel(job), new))
        if read:
            self.hub_reads(len(self.input))

    @rule(n=st.integers(1, 12))
    def hub_reads(self, n: int) -> None:
        """The hub reads the first `n` events of its input in one read: several of one
        channel are coalesced before the fan-out, as `Hub._on_replies` does."""
        batch: list[tuple[str, Event]] = list(self.input[:n])
        del self.input[:n]
        channels = [channel for channel, _ in batch]
        if len(set(channels)) < len(channels):
            batch = coalesce(batch, self.previous)
        for _, item in batch:
            self.live(item)

    def live(self, item: Event | Outage | Resync) -> None:
        self.core.live(item)
        # Checked as live items arrive (a history replay may pass the limit for a moment:
        # it is bounded by the history's own size).
        assert self.core.too_slow is not None or self.core.queued_bytes <= self.max_bytes

    @rule(job=st.sampled_from(JOBS))
    def lose_one(self, job: str) -> None:
        """An event published but not delivered live (pub/sub dropped it: the hub resyncs
        the channel later, by teardown at the latest); the next live one jumps ahead."""
        if self.ended(job):
            return
        seq = len(self.truth[job]) + 1
        self.truth[job].append(event(job, seq, f"S{self.state[job]}"))
        self.owed.add(job)

    @rule()
    def start_read(self) -> None:
        """A history read goes out: it sees history as it is now, and lands later."""
        needed = self.core.need()
        for job in [needed] if isinstance(needed, str) else needed or []:
            since = self.core.last[job]
            self.in_flight.append((job, since, self.page(job, since)))

    @rule()
    def finish_read(self) -> None:
        if self.in_flight:
            job, since, page = self.in_flight.pop(0)
            assert not self.core.page(job, since, page)

    @rule(job=st.sampled_from(JOBS))
    def outage(self, job: str) -> None:
        """The channel's connection is lost: what it had not read yet is lost with it."""
        channel = KEYS.job_channel(job)
        self.input = [(ch, e) for ch, e in self.input if ch != channel]
        self.previous.pop(channel, None)
        self.down.add(job)
        self.live(Outage(channel))

    @rule(job=st.sampled_from(JOBS))
    def back(self, job: str) -> None:
        if job in self.down:
            self.down.discard(job)
            self.live(Resync(KEYS.job_channel(job)))

    @rule()
    def read_history(self) -> None:
        self.read(self.core.need())

    def read(self, needed: str | list[str] | None) -> None:
        for job in [needed] if isinstance(needed, str) else needed or []:
            since = self.core.last[job]
            assert not self.core.page(job, since, self.page(job, since))
        self.core.effects.clear()

    @rule(n=st.integers(1, 20))
    def take(self, n: int) -> None:
        for _ in range(n):
            item = self.core.pop()
            if item is None:
                return
            self.client.take(item)

    @rule(open_=st.booleans(), sending=st.booleans())
    def socket(self, open_: bool, sending: bool) -> None:
        """The socket takes direct writes, or is full; a send may be in progress."""
        self.core.write_now = self.client.frame if open_ else (lambda frame, count: False)
        self.core.sending = sending

    # -- what must hold -----------------------------------------------------------------

    @invariant()
    def ordered(self) -> None:
        check_order(self.client)

    @invariant()
    def bounded(self) -> None:
        history = sum(len(e.raw) for events in self.truth.values() for e in events)
        notices = CONTROL_BYTES * 2 * len(JOBS)  # `subscribed`, and one outage notice, a job
        assert self.core.too_slow is not None or self.core.queued_bytes <= self.max_bytes + history + notices

    def teardown(self) -> None:
        """Let the client catch up: everything that must arrive did, once."""
        if self.core.too_slow is not None:
            return  # closed 1013; it resumes by seq on a new connection (its own test)
        self.core.sending = False
        self.hub_reads(len(self.input))
        while self.in_flight:
            self.finish_read()
        for job in self.owed - self.down:
            self.core.live(Resync(KEYS.job_channel(job)))
        for job in list(self.down):
            self.back(job)
        for _ in range(1000):  # as the driver does: send what is queued, read what is asked
            if self.core.too_slow is not None:
                return  # as above
            self.take(1000)
            needed = self.core.need()
            if needed is None and not self.core.queued:
                break
            self.read(needed)
        check_order(self.client)
        for job in JOBS:
            got = self.client.events.get(job, [])
            seqs = [seq for seq, *_ in got]
            must = transitions(self.truth[job])
            assert [s for s in seqs if s in must] == must, (job, must, got)  # each once, in order
            for seq, skipped, _, _ in got:  # none hidden in a coalesced count
                assert not set(range(seq - skipped, seq)) & set(must), (job, seq, skipped, must)
            assert seqs[-1] == self.truth[job][-1].seq  # the newest, always


def test_the_stream_rules_hold_in_any_interleaving() -> None:
    # Run through a function, not `StreamMachine.TestCase`: Hypothesis digests the factory
    # with `inspect.getsource`, which parses a class's whole module with `ast` (on Python
    # 3.11.7 that can fail with "AST constructor recursion depth mismatch" after another
    # test hit a RecursionError; a function's source is found by line number).
    run_state_machine_as_test(
        lambda: StreamMachine(),
        settings=settings(
            max_examples=300,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- the findings, as examples ---------------------------------------------------------


def _drain(core: ClientStream) -> list[Item]:
    out = []
    while (item := core.pop()) is not None:
        out.append(item)
    return out


def _shown(items: list[Any]) -> list[tuple[int, int, str]]:
    rows = []
    for item in items:
        if isinstance(item, Coalesced):
            rows.append((item.delivery.seq, item.skipped, item.delivery.state))
        elif isinstance(item, Delivery):
            rows.append((item.seq, 0, item.state))
    return rows


def test_a_slow_reader_keeps_the_first_event_of_each_state() -> None:
    """Finding 1: `(1501, S2, coalesced 167) → (2001, S3, coalesced 499)` lost seq 1502,
    the first S3 event, to a later S3 event in the queue."""
    core = ClientStream(KEYS, queue_limit=1000, max_bytes=1 << 30)
    core.begin("j", 0, None)
    truth = [event("j", 1, "S1")]
    core.first_page("j", Stream("e1", 1, truth), None)
    seq = 1
    for state in ("S2", "S3"):
        for _ in range(500):
            seq += 1
            core.live(event("j", seq, state))
    core.live(event("j", seq + 1, "DONE", final=True))
    assert _shown(_drain(core)) == [
        (1, 0, "S1"),
        (2, 0, "S2"),
        (501, 498, "S2"),
        (502, 0, "S3"),
        (1001, 498, "S3"),
        (1002, 0, "DONE"),
    ]


@pytest.mark.parametrize("ended", [False, True])
def test_a_late_joiner_gets_every_transition_from_history(ended: bool) -> None:
    """Finding 2: a client from `since=0` on a job with PENDING, 500 PROGRESS and SUCCESS
    got `[1, 229 (coalesced 227), 230, …]` or `[1, 501 (coalesced 499), 502]`: seq 2, the
    PENDING → PROGRESS transition, was never sent."""
    history = [event("j", 1, "PENDING")] + [event("j", s, "PROGRESS") for s in range(2, 502)]
    if ended:
        history.append(event("j", 502, "SUCCESS", final=True))
    core = ClientStream(KEYS, queue_limit=1000, max_bytes=1 << 30)
    core.begin("j", 0, None)
    core.first_page("j", Stream("e1", len(history), history), None)
    expected = [(1, 0, "PENDING"), (2, 0, "PROGRESS"), (501, 498, "PROGRESS")]
    assert _shown(_drain(core)) == expected + ([(502, 0, "SUCCESS")] if ended else [])


def test_a_gap_fill_is_never_overtaken_by_the_event_after_it() -> None:
    """The 180-before-179 bug: with 179 missed live (an outage) and 180 waiting behind the
    history read it needs, no way of taking from the queue hands 180 first."""
    core = ClientStream(KEYS, queue_limit=1000, max_bytes=1 << 30)
    history = [event("j", s, "S") for s in range(1, 179)]
    core.begin("j", 0, None)
    core.first_page("j", Stream("e1", 178, history), None)
    sent = _drain(core)
    core.live(event("j", 180, "S"))  # 179 was missed: a gap
    assert core.pop_event() is None and core.pop() is None  # 180 waits for the read
    assert core.need() == "j"
    history.append(event("j", 179, "S"))
    history.append(event("j", 180, "S"))
    assert not core.page("j", 178, Stream("e1", 180, history[-2:]))
    sent += _drain(core)
    assert [row[0] for row in _shown(sent)][-2:] == [179, 180] or _shown(sent)[-1] == (180, 1, "S")
    check = Client()
    for item in sent:
        check.take(item)
    check_order(check)


@given(run=st.integers(1, 6), last=st.integers(0, 12), open_=st.booleans())
@settings(max_examples=200, deadline=None)
def test_a_run_the_hub_coalesced_is_taken_from_wherever_the_client_is(
    run: int, last: int, open_: bool
) -> None:
    """The hub, behind on its input, hands on seq N standing for the `run` before it
    (`server.backlog`), to a client whose last seq is anywhere. Had the event before the
    run: it takes the hub's own frame (on the direct path, the very bytes every such
    client gets). Had part of the run: it gets N with its own, smaller count, and no
    history read. Further behind: a real gap, read from history. Either way the counts add
    up and nothing is sent twice."""
    n = run + 4  # seq 1 in S0, then S1 from seq 2: the run (n-run..n) is all progress
    history = [event("j", 1, "S0")] + [event("j", s, "S1") for s in range(2, n + 1)]
    last = min(last, n - 1)
    core = ClientStream(KEYS, queue_limit=100, max_bytes=1 << 20)
    client, written = Client(), []

    def write(frame: bytes, count: int) -> bool:
        written.append(frame)
        return client.frame(frame, count)

    core.write_now = write if open_ else (lambda frame, count: False)
    core.begin("j", 0, None)
    core.first_page("j", Stream("e1", last, history[:last]), None)
    for item in _drain(core):
        client.take(item)
    item = Coalesced(history[-1], run)
    core.live(item)
    reads = 0
    while True:
        for queued in _drain(core):
            client.take(queued)
        needed = core.need()
        if needed is None and not core.queued:
            break
        if needed is not None:
            reads += 1
            since = core.last["j"]
            assert not core.page("j", since, Stream("e1", n, [e for e in history if e.seq > since]))
    check_order(client)
    got = client.events["j"]
    assert got[-1][0] == n and [s for s, *_ in got if s in (1, 2)] == [1, 2]  # the transitions
    assert reads == (last < n - run - 1)
    if last == n - run - 1:
        assert got[-1][:2] == (n, run)
        if open_:
            assert written[-1] is item.ws_frame  # shared, not built for this client
    elif last >= n - run:
        assert got[-1][:2] == (n, n - last - 1)
