"""A process behind on its pub/sub input coalesces progress per job before the fan-out
(`server.backlog`): every transition and final event kept, in order, the newest progress
kept, and `coalesced` counts that add up with the seqs. And a process keeping up
coalesces nothing. What a read keeps of a job goes to each watcher in step in one write
(`tests/test_joined_runs.py` has the rule for that).

The pure rule is tested directly (examples, then Hypothesis over any events cut into any
reads); the hub and a whole server are tested against a real Redis, the backlog made by
holding the event loop busy while a burst is published (the loop is the server's: the
hub cannot read until the burst is all there). Nothing here is timed."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import redis
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st

from jobwire.server.backlog import Event, coalesce, continues
from jobwire.server.events import Coalesced, Delivery, Run
from jobwire.server.hub import Hub
from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free, next_of, recv_json, sse_blocks, until_subscribed
from tests.support import RedisServer, redis_cluster, run_server, settings_for, wait_until


def event(job: str, seq: int, state: str, *, final: bool = False, epoch: str = "e1") -> Delivery:
    doc = {"job_id": job, "seq": seq, "epoch": epoch, "state": state, "final": final, "progress": {"n": seq}}
    return Delivery.parse(orjson.dumps(doc))


def shown(kept: list[tuple[str, Event]]) -> list[tuple[str, int, int]]:
    """(channel, seq, coalesced) of what a read fans out."""
    rows = []
    for channel, item in kept:
        if isinstance(item, Coalesced):
            rows.append((channel, item.delivery.seq, item.skipped))
        else:
            rows.append((channel, item.seq, 0))
    return rows


# -- the rule, by example ------------------------------------------------------------------


def test_a_read_of_one_event_per_channel_is_fanned_out_as_it_came() -> None:
    batch: list[tuple[str, Event]] = [("a", event("a", 5, "S")), ("b", event("b", 9, "S"))]
    previous = {"a": event("a", 4, "S"), "b": event("b", 8, "S")}
    kept = coalesce(batch, previous)
    assert all(k[1] is b[1] for k, b in zip(kept, batch, strict=True)) and len(kept) == 2


def test_a_run_of_progress_keeps_its_newest_and_every_transition() -> None:
    previous = {"a": event("a", 1, "PENDING")}
    batch: list[tuple[str, Event]] = [
        ("a", event("a", 2, "WORK")),  # a transition: kept
        ("a", event("a", 3, "WORK")),
        ("a", event("a", 4, "WORK")),
        ("a", event("a", 5, "WORK")),  # the newest of the run: stands for 3 and 4
        ("a", event("a", 6, "UPLOAD")),  # a transition, followed at once by another
        ("a", event("a", 7, "SUCCESS", final=True)),
    ]
    assert shown(coalesce(batch, previous)) == [("a", 2, 0), ("a", 5, 2), ("a", 6, 0), ("a", 7, 0)]
    assert previous["a"].seq == 7


def test_the_previous_read_decides_whether_the_first_event_is_progress() -> None:
    previous: dict[str, Delivery] = {}
    first = coalesce([("a", event("a", 1, "W")), ("a", event("a", 2, "W"))], previous)
    assert shown(first) == [("a", 1, 0), ("a", 2, 0)]  # seq 1 begins the job: kept
    second = coalesce([("a", event("a", 3, "W")), ("a", event("a", 4, "W"))], previous)
    assert shown(second) == [("a", 4, 1)]  # 3 continued 2 (sent): it is progress
    third = coalesce([("a", event("a", 5, "X")), ("a", event("a", 6, "X"))], previous)
    assert shown(third) == [("a", 5, 0), ("a", 6, 0)]  # 5 is a transition: never dropped


def test_what_does_not_follow_is_kept() -> None:
    """A seq that does not follow (a message lost in an outage, a stale `previous`), a
    new epoch, a final event: none is taken for progress."""
    previous = {"a": event("a", 3, "W")}
    batch: list[tuple[str, Event]] = [
        ("a", event("a", 7, "W")),  # 4..6 never came: not known to be progress
        ("a", event("a", 8, "W")),
        ("a", event("a", 1, "W", epoch="e2")),  # the history began again
        ("a", event("a", 2, "W", epoch="e2")),
        ("a", event("a", 3, "W", final=True, epoch="e2")),
    ]
    assert shown(coalesce(batch, previous)) == [
        ("a", 7, 0),
        ("a", 8, 0),
        ("a", 1, 0),
        ("a", 2, 0),
        ("a", 3, 0),
    ]


def test_channels_coalesce_apart_and_a_shared_channel_by_job() -> None:
    """Two jobs' channels, and the all-jobs channel carrying both: runs are per channel,
    and on a channel of many jobs another job's event ends a run."""
    previous = {"a": event("a", 1, "W"), "b": event("b", 1, "W"), "all": event("a", 1, "W")}
    batch: list[tuple[str, Event]] = []
    for seq in (2, 3, 4):
        batch += [("a", event("a", seq, "W")), ("all", event("a", seq, "W"))]
    for seq in (2, 3):
        batch += [("b", event("b", seq, "W")), ("all", event("b", seq, "W"))]
    kept = shown(coalesce(batch, previous))
    assert [row for row in kept if row[0] == "a"] == [("a", 4, 2)]
    assert [row for row in kept if row[0] == "b"] == [("b", 3, 1)]
    assert [row for row in kept if row[0] == "all"] == [("all", 4, 2), ("all", 2, 0), ("all", 3, 0)]


def test_a_count_already_carried_is_added() -> None:
    previous = {"a": event("a", 1, "W")}
    batch: list[tuple[str, Event]] = [("a", Coalesced(event("a", 4, "W"), 2)), ("a", event("a", 5, "W"))]
    assert shown(coalesce(batch, previous)) == [("a", 5, 3)]


# -- the rule, over any events cut into any reads -------------------------------------------

JOBS = ("a", "b")


@st.composite
def traffic(draw: st.DrawFn) -> tuple[list[tuple[str, Delivery]], list[int]]:
    """Events of two jobs on their channels and on a shared channel, some lost on the way
    (a seq that never arrives), and where reads end."""
    steps = draw(st.lists(st.tuples(st.sampled_from(JOBS), st.sampled_from("ppppsfl")), max_size=60))
    seq = dict.fromkeys(JOBS, 0)
    state = dict.fromkeys(JOBS, 0)
    ended: set[str] = set()
    messages: list[tuple[str, Delivery]] = []
    for job, kind in steps:
        if job in ended:
            continue
        seq[job] += 1
        if kind == "l":
            continue  # lost: never delivered
        state[job] += kind == "s"
        new = event(job, seq[job], "DONE" if kind == "f" else f"S{state[job]}", final=kind == "f")
        if kind == "f":
            ended.add(job)
        messages += [(job, new), ("all", new)]
    cuts = sorted(draw(st.sets(st.integers(0, len(messages)), max_size=20)))
    return messages, cuts


def reads(messages: list[tuple[str, Delivery]], cuts: list[int]) -> list[list[tuple[str, Event]]]:
    bounds = [0, *cuts, len(messages)]
    return [list(messages[i:j]) for i, j in zip(bounds, bounds[1:], strict=False) if j > i]


@given(traffic())
@settings(max_examples=300, deadline=None)
def test_no_transition_is_dropped_the_newest_is_kept_and_counts_add_up(
    drawn: tuple[list[tuple[str, Delivery]], list[int]],
) -> None:
    messages, cuts = drawn
    previous: dict[str, Delivery] = {}
    out: list[tuple[str, Event]] = []
    newest: set[tuple[str, int]] = set()  # each read's last event of each channel
    for batch in reads(messages, cuts):
        out += coalesce(batch, previous)
        newest |= {(ch, e.seq, e.job_id) for ch, e in dict(batch).items()}  # type: ignore[union-attr]
    for channel in ("a", "b", "all"):
        for job in JOBS:
            truth = [e for ch, e in messages if ch == channel and e.job_id == job]
            got = [
                (i.delivery, i.skipped) if isinstance(i, Coalesced) else (i, 0)
                for ch, i in out
                if ch == channel and (i.delivery if isinstance(i, Coalesced) else i).job_id == job
            ]
            order = [truth.index(e) for e, _ in got]
            assert order == sorted(order)  # in order, no duplicate
            must = {
                i for i, e in enumerate(truth) if i == 0 or e.final or truth[i - 1].state != e.state
            }  # transitions
            assert must <= set(order), (channel, job, must - set(order))
            for e in truth:
                if (channel, e.seq, job) in newest:
                    assert truth.index(e) in order  # the newest of each read
            counted = 0
            for at, (e, skipped) in zip(order, got, strict=True):
                # Stands for the `skipped` events before it: dropped, all progress.
                stood_for = range(at - skipped, at)
                assert all(i not in order and i not in must for i in stood_for), (channel, e.seq, skipped)
                assert all(continues(truth[i], truth[i + 1]) for i in stood_for)
                counted += skipped
            assert counted == len(truth) - len(got)  # every dropped event counted once
    assert len(messages) - len(out) == sum(i.skipped for _, i in out if isinstance(i, Coalesced))


@given(traffic())
@settings(max_examples=100, deadline=None)
def test_reads_with_one_event_per_channel_lose_nothing(
    drawn: tuple[list[tuple[str, Delivery]], list[int]],
) -> None:
    messages, _ = drawn
    previous: dict[str, Delivery] = {}
    for i in range(0, len(messages), 2):  # an event on its job's channel and the shared one
        batch: list[tuple[str, Event]] = list(messages[i : i + 2])
        assert coalesce(batch, previous) == batch


# -- the hub on a real Redis ------------------------------------------------------------------


def _payload(job: str, seq: int, state: str, final: bool = False) -> bytes:
    return orjson.dumps({"job_id": job, "seq": seq, "epoch": None, "state": state, "final": final})


async def test_the_hub_coalesces_a_backlog_on_its_input(own_redis: RedisServer) -> None:
    """Two channels published in turns while the hub's event loop is held: each sink gets
    its channel's transitions and final event in order, the newest progress, and counts
    that add up; the hub counts what it dropped."""
    hub = Hub(own_redis.url)
    await hub.start()
    got: dict[str, list[Any]] = {"x": [], "y": []}

    def sink(items: list[Any]) -> Callable[[Any], None]:
        def take(item: Any) -> None:  # a run's events, as a watcher out of step gets them
            items.extend(item.items if isinstance(item, Run) else [item])

        return take

    try:
        for channel in got:
            await hub.subscribe(channel, sink(got[channel]))
        client = redis.Redis.from_url(own_redis.url)
        seq = 0
        for state in ("A", "B", "C"):  # held: this loop is the hub's (a sync client, no await)
            for _ in range(50):
                seq += 1
                for channel in got:
                    client.publish(channel, _payload(channel, seq, state))
        for channel in got:
            client.publish(channel, _payload(channel, seq + 1, "DONE", final=True))
        client.close()
        await wait_until(
            lambda: all(items and getattr(items[-1], "final", False) for items in got.values()),
            what="each sink has its final event",
        )
    finally:
        await hub.stop()
    # (Nothing need be joined here: the two channels' events alternate, and only events
    # side by side in a read are joined; a sink unpacks a run all the same.)
    assert hub.input_coalesced > 0
    transitions = [1, 51, 101, 151]
    for items in got.values():
        rows = [(i.delivery.seq, i.skipped) if isinstance(i, Coalesced) else (i.seq, 0) for i in items]
        assert_gap_free([{"seq": s, "coalesced": k} for s, k in rows])
        seqs = [s for s, _ in rows]
        assert [s for s in seqs if s in transitions] == transitions
        assert {50, 100, 150} <= set(seqs)  # the newest progress of each state
        assert not any(set(range(s - k, s)) & set(transitions) for s, k in rows)  # none counted


# -- a whole server ----------------------------------------------------------------------------

STATES = [f"STEP{i}" for i in range(6)]
PER_STATE = 40


def _record_burst(recorder: Recorder, job: str) -> list[tuple[int, str]]:
    """The burst after PENDING (seq 1): (seq, state) of each event, the final one last. One
    state has a single event, so two transitions follow each other."""
    out = []
    for i, state in enumerate(STATES):
        for n in range(1 if i == 2 else PER_STATE):
            out.append((recorder.record(job, state, progress={"n": n}), state))
    out.append((recorder.record(job, "SUCCESS", result=None), "SUCCESS"))
    return out  # type: ignore[return-value]


# Each reader says when it is live: once it has had PENDING (seq 1) from history, which
# is read only after Redis confirmed the subscription; the all-jobs reader on its ack.


async def _ws_events(url: str, first: dict[str, Any], job: str, live: asyncio.Event) -> list[dict[str, Any]]:
    async with websockets.connect(url, max_queue=None) as ws:
        await ws.send(json.dumps(first))
        events: list[dict[str, Any]] = []
        while not (events and events[-1]["final"]):
            msg = await next_of(ws, "event", "subscribed_all", timeout=20)
            if msg["type"] == "subscribed_all" or msg["seq"] == 1:
                live.set()
            if msg["type"] == "event" and msg["job_id"] == job:
                events.append(msg)
        return events


async def _single_ws_events(url: str, live: asyncio.Event) -> list[dict[str, Any]]:
    events = []
    async with websockets.connect(url, max_queue=None) as ws:
        async for text in ws:  # until the server closes it, after the final event
            msg = json.loads(text)
            if msg["type"] == "event":
                events.append(msg)
                live.set()
    return events


async def _sse_events(url: str, live: asyncio.Event) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=20) as http, http.stream("GET", url) as resp:
        async for block in sse_blocks(resp):
            if block.get("event", "message") == "message":
                events.append(json.loads(block["data"]))
                live.set()
                if events[-1]["final"]:
                    break
    return events


def _check(name: str, events: list[dict[str, Any]], burst: list[tuple[int, str]], first: int) -> None:
    truth = [(1, "PENDING"), *burst]
    must = [s for i, (s, state) in enumerate(truth) if i == 0 or truth[i - 1][1] != state]
    must = [s for s in must if s >= first]
    newest = [s for i, (s, state) in enumerate(truth[:-1]) if truth[i + 1][1] != state and s >= first]
    seqs = [e["seq"] for e in events]
    assert [s for s in seqs if s in must] == must, (name, [s for s in must if s not in seqs])
    assert set(newest) <= set(seqs), (name, sorted(set(newest) - set(seqs)))
    for e in events:  # no transition hidden in a coalesced count
        assert not set(range(e["seq"] - e.get("coalesced", 0), e["seq"])) & set(must), (name, e)
    assert_gap_free(events, first=first)
    assert events[-1]["final"] and events[-1]["seq"] == burst[-1][0]


async def test_a_server_behind_on_its_input_coalesces_and_loses_no_transition(
    own_redis: RedisServer,
) -> None:
    """Readers on `/ws`, `/ws/jobs/{id}`, SSE and the all-jobs stream; a burst published
    while the server's event loop is held: every reader gets every transition and the
    final event in order, each state's newest progress, and counts that add up; the
    server says how much it coalesced at its input."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    job = "overload"
    recorder.record(job, "PENDING", task="demo")
    async with run_server(settings) as srv:
        live = [asyncio.Event() for _ in range(4)]
        readers = {
            "/ws": _ws_events(f"{srv.ws_url}/ws", {"op": "subscribe", "job_ids": [job]}, job, live[0]),
            "/ws/jobs": _single_ws_events(f"{srv.ws_url}/ws/jobs/{job}", live[1]),
            "SSE": _sse_events(f"{srv.url}/api/v1/jobs/{job}/events", live[2]),
            "all-jobs": _ws_events(f"{srv.ws_url}/ws", {"op": "subscribe_all"}, job, live[3]),
        }
        tasks = {name: asyncio.create_task(coro) for name, coro in readers.items()}
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in live)), 20)
        burst = _record_burst(recorder, job)  # holds the loop: the hub reads it all at once
        results = {name: await asyncio.wait_for(task, 30) for name, task in tasks.items()}
        async with httpx.AsyncClient(base_url=srv.url) as http:
            metrics = (await http.get("/metrics")).text
    for name, events in results.items():
        _check(name, events, burst, first=2 if name == "all-jobs" else 1)
    for counter in ("coalesced", "joined"):  # the server was behind: it coalesced and joined
        match = re.search(rf"^jobwire_input_{counter}_total (\S+)$", metrics, re.MULTILINE)
        assert match and float(match.group(1)) > 0, counter


async def test_a_server_keeping_up_coalesces_nothing(own_redis: RedisServer) -> None:
    """Events published one at a time, each received before the next: every one arrives,
    none coalesced, at the input or anywhere, and none joined."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("calm", "PENDING")
    async with run_server(settings) as srv, websockets.connect(f"{srv.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["calm"]}))
        events = await until_subscribed(ws, "calm")
        for i in range(40):
            await asyncio.to_thread(recorder.record, "calm", "WORKING", progress={"i": i})
            events.append(await next_of(ws, "event"))
        await asyncio.to_thread(recorder.record, "calm", "SUCCESS", result=None)
        events.append(await next_of(ws, "event"))
        coalesced = srv.services.hub.input_coalesced + srv.services.hub.input_joined
        await ws.send(json.dumps({"op": "ping"}))
        await recv_json(ws)
    assert [e["seq"] for e in events] == list(range(1, 43))
    assert not any(e.get("coalesced") for e in events) and coalesced == 0


async def test_each_cluster_shard_coalesces_its_own_backlog(own_redis: RedisServer) -> None:
    """On a Redis Cluster each shard's hub reads its own connection: jobs on several
    shards, a burst held back by the event loop, and every job's reader gets every
    transition, the newest progress and counts that add up."""
    jobs = [f"shard-job-{i}" for i in range(6)]
    with redis_cluster(3) as nodes:
        settings = settings_for(
            f"redis://127.0.0.1:{nodes[0].port}/0", redis_cluster=True, broker_url=own_redis.url
        )
        recorder = Recorder(redis.RedisCluster.from_url(settings.redis_url), settings)
        for job in jobs:
            recorder.record(job, "PENDING", task="demo")
        async with run_server(settings) as srv:
            live = [asyncio.Event() for _ in jobs]
            tasks = [
                asyncio.create_task(_single_ws_events(f"{srv.ws_url}/ws/jobs/{job}", ready))
                for job, ready in zip(jobs, live, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in live)), 20)
            bursts = {job: _record_burst(recorder, job) for job in jobs}  # holds the loop
            results = [await asyncio.wait_for(task, 30) for task in tasks]
            hub = srv.services.hub
            # (The readers follow job channels only: shard channels, so the shards coalesced.)
            assert hub.shards == 3 and hub.input_coalesced > 0 and hub.input_joined > 0
    for job, events in zip(jobs, results, strict=True):
        _check(job, events, bursts[job], first=1)
