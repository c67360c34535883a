"""Many sockets on one job: every socket gets every event, Redis carries one subscription."""

from __future__ import annotations

import asyncio
import json

import redis
import websockets

from tests.clients import LIFECYCLE, assert_gap_free, events_until_final, submit, until_subscribed
from tests.support import RunningServer

CLIENTS = 200


async def test_200_sockets_one_job_one_redis_subscription(
    server: RunningServer, rclient: redis.Redis
) -> None:
    """200 websockets on one job all get the full lifecycle; PUBSUB NUMSUB for it stays 1."""
    job_id = await submit(server.url, delay=0.4)
    channel = server.services.settings.keys.job_channel(job_id)
    sockets = await asyncio.gather(
        *(websockets.connect(f"{server.ws_url}/ws", max_queue=None) for _ in range(CLIENTS))
    )
    try:
        await asyncio.gather(
            *(ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]})) for ws in sockets)
        )
        replayed = await asyncio.gather(*(until_subscribed(ws, job_id) for ws in sockets))
        # All 200 are subscribed and the job is still running.
        assert rclient.pubsub_numsub(channel) == [(channel.encode(), 1)]
        assert server.services.hub.subscribers(channel) == CLIENTS
        results = await asyncio.gather(
            *(
                events_until_final(ws, job_id, 30, before)
                for ws, before in zip(sockets, replayed, strict=True)
            )
        )
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    for events in results:
        # Each socket saw whatever preceded its subscription as replay, the rest live:
        # either way the whole lifecycle, once.
        assert [e["state"] for e in events] == LIFECYCLE
        assert_gap_free(events)
    # Every watcher gone (and the job final): the subscription is released.
    for _ in range(100):
        if rclient.pubsub_numsub(channel) == [(channel.encode(), 0)]:
            break
        await asyncio.sleep(0.02)
    assert rclient.pubsub_numsub(channel) == [(channel.encode(), 0)]
