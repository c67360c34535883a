"""The per-client feed on a real hub and Redis: overflow and gaps never lose an event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis

from jobwire.server.auth import DEVELOPER
from jobwire.server.events import Delivery
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
    seqs = []
    while True:
        item = await asyncio.wait_for(feed.next(idle=2.0), 5)
        assert item is not None, "feed went idle before the final event"
        if isinstance(item, Delivery) and item.job_id == job_id:
            seqs.append(item.seq)
            if item.final:
                return seqs


async def test_slow_client_overflow_resyncs_from_history(parts) -> None:  # type: ignore[no-untyped-def]
    """A client too far behind has its inbox dropped and gets everything from history, in order.

    48 live events with room for 5: every 6th overflows the inbox and is dropped with it,
    the final one included, so only the resync can deliver it.
    """
    hub, store, recorder, settings = parts
    recorder.record("slow", "PENDING")
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=5, max_jobs=10)
    assert await feed.watch("slow")
    delivered: list[object] = []  # a second sink: the hub hands each event to both in turn
    await hub.subscribe(settings.keys.job_channel("slow"), delivered.append)
    for step in range(47):  # nobody reads the feed meanwhile
        recorder.record("slow", "WORKING", progress={"step": step})
    recorder.record("slow", "SUCCESS", result=None)
    await wait_until(lambda: len(delivered) == 48, what="the hub delivers every live event")
    assert feed._overflowed and not feed._inbox  # the final event went with the inbox
    assert await drain(feed, "slow") == list(range(1, 50))
    feed.close()


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


async def test_trimmed_history_is_announced_as_a_gap(parts) -> None:  # type: ignore[no-untyped-def]
    """Resuming from before the retained history says which seqs are gone, then continues."""
    hub, store, _, settings = parts
    recorder = Recorder(
        redis.Redis.from_url(settings.redis_url), settings.model_copy(update=dict(history_limit=3))
    )
    recorder.record("trimmed", "PENDING")
    for step in range(4):
        recorder.record("trimmed", "WORKING", progress={"step": step})
    recorder.record("trimmed", "SUCCESS", result=None)  # seq 6; history keeps 4, 5, 6
    feed = Feed(hub, store, settings.keys, DEVELOPER, queue_limit=100, max_jobs=10)
    assert await feed.watch("trimmed", since=1)
    items = [feed.next_nowait() for _ in range(5)]
    assert items[0] == {"type": "gap", "job_id": "trimmed", "from": 2, "to": 3}
    assert [i.seq for i in items[1:4]] == [4, 5, 6]  # type: ignore[union-attr]
    assert items[4]["type"] == "subscribed"  # type: ignore[index]
    feed.close()
