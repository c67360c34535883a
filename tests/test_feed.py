"""The per-client feed on a real hub and Redis: overflow and gaps never lose an event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
import redis
from redis.asyncio import Redis

from jobwire.server.auth import DEVELOPER
from jobwire.server.events import Coalesced, Delivery, Resync, Run
from jobwire.server.feed import Feed
from jobwire.server.hub import Hub
from jobwire.server.store import JobStore
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import RedisServer, wait_until


@pytest.fixture
async def parts(own_redis: RedisServer) -> AsyncIterator[tuple[Hub, JobStore, Recorder, Settings]]:
    settings = Settings(redis_url=own_redis.url)
    hub = Hub(own_redis.url)
    await hub.start()
    redis = Redis.from_url(own_redis.url)
    yield hub, JobStore(redis, settings.keys), Recorder(own_redis.client(), settings), settings
    await hub.stop()
    await redis.aclose()


async def drain(feed: Feed, job_id: str) -> list[int]:
    """The seqs a client gets, each coalesced event preceded by the seqs it stands for."""
    seqs = []
    while True:
        item = await asyncio.wait_for(feed.next(idle=2.0), 5)
        assert item is not None, "feed went idle before the final event"
        if isinstance(item, Coalesced) and item.delivery.job_id == job_id:
            seqs += range(item.delivery.seq - item.skipped, item.delivery.seq)
            item = item.delivery
        if isinstance(item, Delivery) and item.job_id == job_id:
            seqs.append(item.seq)
            if item.final:
                return seqs


async def test_slow_reader_gets_newest_progress_and_every_transition(parts) -> None:  # type: ignore[no-untyped-def]
    """While a client reads nothing, its queue keeps every transition (the first event of
    each state) and the final event in their places, and one event per run of progress
    after each: the newest, marked with how many it replaced."""
    hub, store, recorder, settings = parts
    recorder.record("slow", "PENDING")
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=5, max_jobs=10)
    assert await feed.watch("slow")
    delivered: list[object] = []  # a second sink: the hub hands each event to both in turn
    await hub.subscribe(settings.keys.job_channel("slow"), delivered.append)
    # Nobody reads the feed meanwhile. Each event is recorded once the hub has handed on
    # the one before: the hub keeps up (a hub behind would coalesce them itself, see
    # tests/test_overload.py), so the coalescing here is the client queue's.
    events_sent = [("WORKING", step) for step in range(30)] + [("VALIDATING", step) for step in range(17)]
    for n, (state, step) in enumerate(events_sent, 1):
        await asyncio.to_thread(recorder.record, "slow", state, progress={"step": step})
        await wait_until(lambda n=n: len(delivered) == n, what="the hub delivers the event", interval=0.002)
    recorder.record("slow", "SUCCESS", result=None)
    await wait_until(lambda: len(delivered) == 48, what="the hub delivers every live event")
    items = []
    while (item := feed.next_nowait()) is not None:
        items.append(item)
    events = [i for i in items if isinstance(i, (Delivery, Coalesced))]
    kinds = ["Delivery", "Delivery", "Coalesced", "Delivery", "Coalesced", "Delivery"]
    assert [type(e).__name__ for e in events] == kinds
    first_working, working, first_validating, validating, final = events[1:]
    # The first event of each state keeps its place (a transition), and so does the final one.
    assert (first_working.seq, first_working.state) == (2, "WORKING")  # type: ignore[union-attr]
    assert (first_validating.seq, first_validating.state) == (32, "VALIDATING")  # type: ignore[union-attr]
    assert isinstance(working, Coalesced) and isinstance(validating, Coalesced)
    assert (working.delivery.seq, working.skipped, working.delivery.state) == (31, 28, "WORKING")
    assert orjson.loads(working.delivery.raw)["progress"] == {"step": 29}
    assert (validating.delivery.seq, validating.skipped) == (48, 15)
    assert '"coalesced":15,' in validating.frame and orjson.loads(validating.raw)["coalesced"] == 15
    assert isinstance(final, Delivery) and final.seq == 49 and feed.queued_bytes == 0
    feed.close()


async def test_slow_client_overflow_resyncs_from_history(parts) -> None:  # type: ignore[no-untyped-def]
    """Events that must wait for a history read queue in a bounded inbox; a client too far
    behind has it dropped and gets everything again from history, in order.

    A resync puts the job's events behind a history read: it and 47 live events with
    room for 5, so every 6th overflows the inbox and is dropped with it, the final one
    included, and only the resync can deliver it.
    """
    hub, store, recorder, settings = parts
    recorder.record("slow", "PENDING")
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=5, max_jobs=10)
    assert await feed.watch("slow")
    feed._job_sink(Resync(settings.keys.job_channel("slow")))
    delivered: list[object] = []  # each event (a hub behind on its input hands on runs of them)
    await hub.subscribe(
        settings.keys.job_channel("slow"),
        lambda item: delivered.extend(item.items if isinstance(item, Run) else (item,)),
    )
    for step in range(46):  # each a transition: a hub behind on its input keeps them all
        recorder.record("slow", "A" if step % 2 else "B", progress={"step": step})
    recorder.record("slow", "SUCCESS", result=None)
    await wait_until(lambda: len(delivered) == 47, what="the hub delivers every live event")
    assert feed.core.overflowed and not feed.core._inbox  # the final event went with the inbox
    assert await drain(feed, "slow") == list(range(1, 49))
    feed.close()


async def test_queue_past_its_byte_limit_marks_the_client_too_slow(parts) -> None:  # type: ignore[no-untyped-def]
    """Transitions are never coalesced, so a client that reads nothing while they keep
    coming passes its byte limit: it is marked too slow and holds nothing more."""
    hub, store, recorder, settings = parts
    recorder.record("chatty", "PENDING")
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=5, max_jobs=10, max_bytes=4096)
    told: list[str] = []
    feed.on_too_slow = told.append
    assert await feed.watch("chatty")
    for step in range(60):
        recorder.record("chatty", "A" if step % 2 else "B", progress={"pad": "x" * 100})
    await wait_until(lambda: told, what="the feed gives up on its client")
    assert told == [feed.too_slow] and "4096 bytes" in told[0] and feed.closing and feed.exhausted
    assert feed.queued_bytes == 0 and feed.next_nowait() is None
    assert hub.subscribers(settings.keys.job_channel("chatty")) == 0


async def test_live_gap_is_backfilled(parts) -> None:  # type: ignore[no-untyped-def]
    """A live event whose seq jumps ahead makes the feed read the missing ones from history."""
    hub, store, recorder, settings = parts
    recorder.record("gappy", "PENDING")
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=100, max_jobs=10)
    assert await feed.watch("gappy")
    # Record two events this feed cannot hear: unsubscribe (and let Redis drop the
    # subscription), write, resubscribe.
    channel = settings.keys.job_channel("gappy")
    feed._hub.unsubscribe(channel, feed._job_sink)
    while recorder.client.pubsub_numsub(channel)[0][1]:
        await asyncio.sleep(0.01)
    recorder.record("gappy", "A")
    recorder.record("gappy", "B")
    await hub.subscribe(settings.keys.job_channel("gappy"), feed._job_sink)
    recorder.record("gappy", "SUCCESS", result=None)  # arrives live as seq 4 after seq 1
    assert await drain(feed, "gappy") == [1, 2, 3, 4]
    feed.close()


async def test_history_trims_progress_never_transitions(parts) -> None:  # type: ignore[no-untyped-def]
    """Past history_limit the oldest progress goes, never a transition nor the newest
    progress of a state; a client resuming from before gets those, the trimmed ones
    accounted for as coalesced."""
    hub, store, _, settings = parts
    recorder = Recorder(
        redis.Redis.from_url(settings.redis_url), settings.model_copy(update=dict(history_limit=4))
    )
    recorder.record("trimmed", "PENDING")  # 1
    for step in range(5):
        recorder.record("trimmed", "WORKING", progress={"step": step})  # 2-6
    for step in range(3):
        recorder.record("trimmed", "CHECKING", progress={"step": step})  # 7-9
    recorder.record("trimmed", "SUCCESS", result=None)  # 10
    kept = recorder.client.zrange(settings.keys.history("trimmed"), 0, -1, withscores=True)
    assert [int(score) for _, score in kept] == [1, 2, 6, 7, 9, 10]
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=100, max_jobs=10)
    assert await feed.watch("trimmed", since=1)
    items = [feed.next_nowait() for _ in range(6)]
    # Each state's first event keeps its place; the progress after it is the newest kept,
    # standing for the trimmed ones (a late joiner skips no transition).
    shown = [(i.seq, 0) if isinstance(i, Delivery) else (i.delivery.seq, i.skipped) for i in items[:5]]  # type: ignore[union-attr]
    assert shown == [(2, 0), (6, 3), (7, 0), (9, 1), (10, 0)]
    assert items[5]["type"] == "subscribed"  # type: ignore[index]
    feed.close()


async def test_transitions_past_history_max_are_announced_as_a_gap(parts) -> None:  # type: ignore[no-untyped-def]
    """A job that changes state without end keeps history_max events; resuming from before
    them says which seqs are gone (a real gap, not coalesced progress)."""
    hub, store, _, settings = parts
    recorder = Recorder(
        redis.Redis.from_url(settings.redis_url),
        settings.model_copy(update=dict(history_limit=2, history_max=3)),
    )
    recorder.record("flip", "PENDING")
    for step in range(4):
        recorder.record("flip", "A" if step % 2 else "B")  # 2-5, each a transition
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=100, max_jobs=10)
    assert await feed.watch("flip", since=1)
    items = [feed.next_nowait() for _ in range(4)]
    assert items[0] == {"type": "gap", "job_id": "flip", "from": 2, "to": 2}
    assert [i.seq for i in items[1:4]] == [3, 4, 5]  # type: ignore[union-attr]
    feed.close()
