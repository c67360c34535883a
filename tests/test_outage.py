"""Redis blips: clients keep every event across a severed pub/sub connection."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free, events_until_final, next_of, transitions, until_subscribed
from tests.support import RedisServer, run_server, settings_for, wait_until


async def test_events_published_during_pubsub_outage_reach_clients(own_redis: RedisServer) -> None:
    """Events written while the hub's subscription is down arrive via resync: gap-free, no duplicates."""
    settings = settings_for(own_redis.url, heartbeat_interval=1.0)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("blip", "PENDING", task="demo")
    async with run_server(settings) as srv:
        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ["blip"]}))
            events = await until_subscribed(ws, "blip")
            reconnects = srv.services.hub.reconnects
            # Sever the hub's connection and write at once, before it can resubscribe.
            own_redis.client().client_kill_filter(_type="pubsub")
            for step in range(1, 4):
                recorder.record("blip", "WORKING", progress={"step": step, "total": 3})
            recorder.record("blip", "SUCCESS", result={"ok": True})
            # Never silent: the client hears first that the job's events paused.
            told = await next_of(ws, "event", "error")
            assert told["code"] == "unavailable" and told["job_id"] == "blip", told
            events = await events_until_final(ws, "blip", events=events)
            assert srv.services.hub.reconnects > reconnects
    # Read back from history after the outage, the progress may be coalesced; the
    # transitions and the newest progress are all there.
    assert transitions(events) == ["PENDING", "WORKING", "SUCCESS"]
    assert events[-2]["progress"]["step"] == 3
    assert_gap_free(events)


async def test_redis_down_then_back_clients_resume(own_redis: RedisServer) -> None:
    """Redis stops and restarts (data lost): readyz reports it, subscribers recover."""
    settings = settings_for(own_redis.url, heartbeat_interval=1.0, subscribe_timeout=1.0)
    async with run_server(settings) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await http.get("/readyz")).status_code == 200
            own_redis.stop()
            await wait_until(lambda: not srv.services.hub.connected, what="the hub notices Redis is gone")
            down = await http.get("/readyz")
            assert down.status_code == 503 and down.json()["redis"] is False
            status = await http.get("/api/v1/jobs/anything")
            assert status.status_code == 503
            assert status.json()["error"]["code"] == "redis_unavailable"
            own_redis.start()

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await wait_until(ready, what="readyz says ready again")
        recorder = Recorder(own_redis.client(), settings)
        recorder.record("after", "PENDING")
        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ["after"]}))
            events = await until_subscribed(ws, "after")
            recorder.record("after", "SUCCESS", result=1)
            events = await events_until_final(ws, "after", events=events)
    assert [e["state"] for e in events] == ["PENDING", "SUCCESS"]


async def test_shutdown_with_open_streams_completes(own_redis: RedisServer) -> None:
    """Open SSE and websocket clients do not hold the server's shutdown (or the hub's) hostage."""

    settings = settings_for(own_redis.url, heartbeat_interval=1.0)
    Recorder(own_redis.client(), settings).record("held", "PENDING")
    server = run_server(settings)
    srv = await server.__aenter__()
    http = httpx.AsyncClient(base_url=srv.url, timeout=30)

    async def hold_sse() -> None:
        async with http.stream("GET", "/api/v1/events", params={"job": "held", "all": "1"}) as resp:
            async for _ in resp.aiter_lines():
                pass

    sse = asyncio.create_task(hold_sse())
    ws = await websockets.connect(f"{srv.ws_url}/ws")
    await ws.send(json.dumps({"op": "subscribe", "job_ids": ["held"]}))
    await until_subscribed(ws, "held")
    channel = settings.keys.job_channel("held")
    await wait_until(lambda: srv.services.hub.subscribers(channel) == 2, what="the SSE stream is open too")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(server.__aexit__(None, None, None), 8)  # run_server waits up to 10 s
    assert loop.time() - started < 5
    sse.cancel()
    await asyncio.gather(sse, return_exceptions=True)
    await ws.close()
    await http.aclose()


async def test_graceful_shutdown_says_going_away(own_redis: RedisServer) -> None:
    """On shutdown, websockets close with 1001 ("going away": reconnect at once, perhaps to
    another process) and SSE streams end without `end` (so EventSource reconnects)."""
    settings = settings_for(own_redis.url, heartbeat_interval=30.0)
    Recorder(own_redis.client(), settings).record("leaving", "PENDING")
    server = run_server(settings)
    srv = await server.__aenter__()
    ws = await websockets.connect(f"{srv.ws_url}/ws")
    await ws.send(json.dumps({"op": "subscribe", "job_ids": ["leaving"]}))
    await until_subscribed(ws, "leaving")
    controls: list[dict] = []

    async def sse() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            async with http.stream("GET", "/api/v1/events", params={"job": "leaving"}) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        controls.append(json.loads(line[6:]))

    stream = asyncio.create_task(sse())
    channel = settings.keys.job_channel("leaving")
    await wait_until(lambda: srv.services.hub.subscribers(channel) == 2, what="both clients are watching")
    await server.__aexit__(None, None, None)
    with pytest.raises(websockets.ConnectionClosed):
        await ws.recv()
    assert ws.close_code == 1001 and "reconnect" in ws.close_reason
    await asyncio.wait_for(stream, 10)  # the stream ended by itself
    assert {"type": "end"} not in controls


async def test_metrics_say_what_the_server_does(own_redis: RedisServer) -> None:
    """/metrics (Prometheus text): connections by transport, deliveries, events per state,
    hub reconnects (a real Redis restart), Redis latency."""
    settings = settings_for(own_redis.url, heartbeat_interval=1.0)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("metered", "PENDING")
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ["metered"]}))
            events = await until_subscribed(ws, "metered")
            recorder.record("metered", "SUCCESS", result=1)
            await events_until_final(ws, "metered", events=events)
            text = (await http.get("/metrics")).text
            assert 'jobwire_connections{transport="websocket"} 1.0' in text
        assert 'jobwire_deliveries_total{transport="websocket"} 2.0' in text
        assert 'jobwire_events_total{state="SUCCESS"} 1.0' in text
        assert "jobwire_redis_ping_seconds " in text
        own_redis.stop()
        own_redis.start()
        await wait_until(
            lambda: srv.services.hub.reconnects >= 1 and srv.services.hub.connected, what="the hub reconnects"
        )
        text = (await http.get("/metrics")).text
        assert "jobwire_hub_reconnects 1.0" in text or "jobwire_hub_reconnects 2.0" in text
        assert 'jobwire_connections{transport="websocket"} 0.0' in text
