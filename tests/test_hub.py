"""The hub against a real Redis: alone, hundreds at once, churn, and a severed connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis

from jobwire.server.events import Delivery, Outage, Resync
from jobwire.server.hub import Hub, HubUnavailable
from tests.support import RedisServer, redis_server, wait_until


def event(job_id: str, seq: int) -> bytes:
    return json.dumps(
        {"job_id": job_id, "seq": seq, "state": "X", "progress": None, "ts": 0.0, "final": False}
    ).encode()


class Collector:
    def __init__(self) -> None:
        self.items: list[Delivery | Outage | Resync] = []
        self.changed = asyncio.Event()

    def __call__(self, item: Delivery | Outage | Resync) -> None:
        self.items.append(item)
        self.changed.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def hub(own_redis: RedisServer) -> AsyncIterator[Hub]:
    h = Hub(own_redis.url, subscribe_timeout=3.0)
    await h.start()
    yield h
    await h.stop()


async def test_single_subscriber_alone_receives(hub: Hub, own_redis: RedisServer) -> None:
    """One sink subscribing alone is live when subscribe() returns (no listener that stops early)."""
    sink = Collector()
    await hub.subscribe("c1", sink)
    own_redis.client().publish("c1", event("j", 1))
    await sink.wait_for(1)
    assert isinstance(sink.items[0], Delivery) and sink.items[0].seq == 1


async def test_hundreds_subscribe_one_channel_at_once(hub: Hub, own_redis: RedisServer) -> None:
    """500 concurrent subscribers to one channel: all live, one Redis subscription, all receive."""
    sinks = [Collector() for _ in range(500)]
    await asyncio.gather(*(hub.subscribe("shared", s) for s in sinks))
    client = own_redis.client()
    assert client.pubsub_numsub("shared") == [(b"shared", 1)]
    assert client.publish("shared", event("j", 1)) == 1
    await asyncio.gather(*(s.wait_for(1) for s in sinks))
    assert hub.subscribers("shared") == 500


async def test_hundreds_subscribe_distinct_channels_at_once(hub: Hub, own_redis: RedisServer) -> None:
    """300 concurrent subscribers to 300 channels: each is live when its subscribe() returns."""
    sinks = {f"ch{i}": Collector() for i in range(300)}
    await asyncio.gather(*(hub.subscribe(ch, s) for ch, s in sinks.items()))
    client = own_redis.client()
    pipe = client.pipeline()
    for ch in sinks:
        pipe.publish(ch, event(ch, 1))
    assert pipe.execute() == [1] * 300
    await asyncio.gather(*(s.wait_for(1) for s in sinks.values()))


async def test_leave_and_rejoin_before_reconciling_stays_live(hub: Hub, own_redis: RedisServer) -> None:
    """The last sink leaving and a new one joining in the same tick keeps the channel live."""
    client = own_redis.client()
    for i in range(50):
        a, b = Collector(), Collector()
        await hub.subscribe("churn", a)
        hub.unsubscribe("churn", a)
        await hub.subscribe("churn", b)  # must not hang, must be live
        client.publish("churn", event("j", i))
        await b.wait_for(1)
        hub.unsubscribe("churn", b)
    for _ in range(100):
        if client.pubsub_numsub("churn") == [(b"churn", 0)]:
            break
        await asyncio.sleep(0.01)
    assert client.pubsub_numsub("churn") == [(b"churn", 0)]


async def test_concurrent_churn_loses_no_subscriber(hub: Hub, own_redis: RedisServer) -> None:
    """Subscribers joining while others leave the same channel are all live afterwards."""
    leavers = [Collector() for _ in range(100)]
    await asyncio.gather(*(hub.subscribe("mixed", s) for s in leavers))
    stayers = [Collector() for _ in range(100)]

    async def leave(s: Collector) -> None:
        hub.unsubscribe("mixed", s)

    await asyncio.gather(*(leave(s) for s in leavers), *(hub.subscribe("mixed", s) for s in stayers))
    own_redis.client().publish("mixed", event("j", 1))
    await asyncio.gather(*(s.wait_for(1) for s in stayers))
    assert all(not s.items for s in leavers)


async def test_severed_connection_resyncs_subscribers(hub: Hub, own_redis: RedisServer) -> None:
    """After Redis drops the hub's connection, the hub tells sinks (never silent),
    reconnects, resubscribes, and tells them to resync."""
    sink = Collector()
    await hub.subscribe("sev", sink)
    client = own_redis.client()
    client.client_kill_filter(_type="pubsub")
    await sink.wait_for(2, timeout=10)
    assert sink.items == [Outage("sev"), Resync("sev")]
    assert hub.reconnects >= 1
    client.publish("sev", event("j", 9))
    await sink.wait_for(3)
    assert isinstance(sink.items[2], Delivery) and sink.items[2].seq == 9


async def test_redis_restart_recovers_and_new_subscribers_wait(hub: Hub, own_redis: RedisServer) -> None:
    """Redis down: subscribe() waits; Redis back: it completes, and old sinks get a Resync."""
    old = Collector()
    await hub.subscribe("r", old)
    own_redis.stop()
    await wait_until(lambda: not hub.connected, what="the hub notices Redis is gone")
    new = Collector()
    waiting = asyncio.create_task(hub.subscribe("r2", new))
    tries = hub.reconnects
    await wait_until(lambda: hub.reconnects >= tries + 2, what="the hub retries twice more")
    assert not waiting.done()  # still waiting for a Redis that is not there
    own_redis.start()
    await asyncio.wait_for(waiting, 10)
    await old.wait_for(2, timeout=10)
    assert old.items == [Outage("r"), Resync("r")]
    client = own_redis.client()
    client.publish("r2", event("j", 1))
    await new.wait_for(1)


async def test_subscribe_times_out_while_redis_down(own_redis: RedisServer) -> None:
    """With Redis gone for longer than subscribe_timeout, subscribe() raises HubUnavailable."""
    own_redis.stop()
    h = Hub(own_redis.url, subscribe_timeout=0.5)
    await h.start()
    try:
        with pytest.raises(HubUnavailable):
            await h.subscribe("x", Collector())
        assert h.subscribers("x") == 0
    finally:
        await h.stop()


async def test_malformed_payload_is_dropped_not_fatal(hub: Hub, own_redis: RedisServer) -> None:
    """A non-event message on a channel is logged and dropped; later events still arrive."""
    sink = Collector()
    await hub.subscribe("m", sink)
    client: redis.Redis = own_redis.client()
    client.publish("m", b"not json")
    client.publish("m", event("j", 2))
    await sink.wait_for(1)
    assert sink.items[0].seq == 2  # type: ignore[union-attr]


async def test_stop_right_after_unsubscribe_completes(own_redis: RedisServer) -> None:
    """Stopping while the UNSUBSCRIBE is on the wire finishes (redis-py can swallow that cancel)."""
    for _ in range(5):
        h = Hub(own_redis.url)
        await h.start()
        sink = Collector()
        await h.subscribe("bye", sink)
        h.unsubscribe("bye", sink)
        await asyncio.sleep(0)  # the reconciler starts sending UNSUBSCRIBE
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = asyncio.create_task(h.stop())
        await asyncio.wait({stopping}, timeout=3)
        assert stopping.done() and loop.time() - started < 2, "hub did not stop"


async def test_a_channel_moved_during_an_outage_is_resynced_where_it_lands(own_redis: RedisServer) -> None:
    """A shard's Redis dies (its subscribers are told), and the channel moves to another
    node's hub before it comes back: there, once confirmed, they get their Resync and the
    new node's events (the case of a cluster primary failing over)."""
    with redis_server() as other:
        old, new = Hub(own_redis.url, reconnect_max=0.2), Hub(other.url)
        await old.start()
        await new.start()
        try:
            sink = Collector()
            await old.subscribe("moving", sink)
            own_redis.stop()
            await sink.wait_for(1, timeout=10)
            moving = old.release("moving")
            assert moving is not None and moving.resync
            new.adopt("moving", moving)
            await sink.wait_for(2, timeout=10)
            assert sink.items == [Outage("moving"), Resync("moving")]
            other.client().publish("moving", event("j", 7))
            await sink.wait_for(3)
            assert isinstance(sink.items[2], Delivery) and sink.items[2].seq == 7
            assert old.subscribers("moving") == 0 and new.subscribers("moving") == 1
        finally:
            await old.stop()
            await new.stop()


async def test_a_waiting_subscriber_moves_with_its_channel(own_redis: RedisServer) -> None:
    """A subscribe() still waiting for a dead node's confirmation completes on the node
    its channel moved to."""
    with redis_server() as other:
        own_redis.stop()
        old, new = Hub(own_redis.url, subscribe_timeout=10), Hub(other.url)
        await old.start()
        await new.start()
        try:
            sink = Collector()
            waiting = asyncio.create_task(old.subscribe("later", sink))
            await wait_until(lambda: old.subscribers("later") == 1, what="the subscriber waits")
            moving = old.release("moving-nothing")
            assert moving is None
            moving = old.release("later")
            assert moving is not None and not moving.resync
            new.adopt("later", moving)
            await asyncio.wait_for(waiting, 10)
            other.client().publish("later", event("j", 1))
            await sink.wait_for(1)
            assert sink.items[0].seq == 1  # type: ignore[union-attr]
        finally:
            await old.stop()
            await new.stop()
