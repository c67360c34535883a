"""Frames written straight from the hub's dispatch (`server.direct`) keep every guarantee:
a client keeping up gets its events that way, in order and gap-free, mixed with what the
socket's writer sends (replies, replayed history), and a final event still closes
`/ws/jobs/{id}`."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import orjson
import pytest
import websockets
from websockets.frames import Frame, Opcode

from jobwire.server.direct import frame_writer
from jobwire.server.events import ws_frame
from jobwire.server.metrics import Tally
from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free, recv_json, until_subscribed
from tests.support import RedisServer, run_server, settings_for


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_a_client_keeping_up_gets_frames_written_directly(own_redis: RedisServer) -> None:
    """Live events go straight to the socket, interleaved with the writer's replies and
    replayed history, in order; the single-job socket still closes after the final event."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("direct", "PENDING")
    recorder.record("direct", "STARTED")  # both replayed from history, through the writer
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        async with (
            websockets.connect(f"{srv.ws_url}/ws") as ws,
            websockets.connect(
                f"{srv.ws_url}/ws/jobs/direct",
                max_queue=None,  # read only at the end, and lose no frame
            ) as single,
        ):
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ["direct"]}))
            replayed = await until_subscribed(ws, "direct")
            # A dashboard: its all-jobs events take the feed's general path, not the fast one.
            dashboard = await websockets.connect(f"{srv.ws_url}/ws", max_queue=None)
            await dashboard.send(json.dumps({"op": "subscribe_all"}))
            while (await recv_json(dashboard, 10))["type"] != "subscribed_all":
                pass

            async def emit() -> None:
                for i in range(300):
                    # In a thread: the server dispatches each event while the next is written.
                    await asyncio.to_thread(recorder.record, "direct", "WORKING", progress={"i": i})
                    if i % 50 == 0:
                        await ws.send(json.dumps({"op": "ping"}))  # replies interleave with events
                await asyncio.to_thread(recorder.record, "direct", "SUCCESS", result=300)

            emitting = asyncio.create_task(emit())
            events, other = list(replayed), []
            while not (events and events[-1]["final"]):
                msg = await recv_json(ws, 20)
                (events if msg["type"] == "event" else other).append(msg)
            await emitting
            dashboard_other = []
            while True:
                msg = await recv_json(dashboard, 20)
                if msg["type"] != "event":
                    dashboard_other.append(msg["type"])
                elif msg["final"]:
                    break
            await dashboard.close()
            single_events = [json.loads(m) async for m in single]
            assert single.close_code == 1000  # the final event still closes the single-job socket
        text = (await http.get("/metrics")).text

    # Only the six pongs: a frame written directly does not wake the socket's writer
    # (which, finding nothing to send, took the wake for idleness and sent a heartbeat).
    assert [m["type"] for m in other] == ["pong"] * 6
    assert dashboard_other == []
    streams = (events, [e for e in single_events if e.get("type") == "event"])
    for got in streams:
        # In order and gap-free. A reader that falls behind (this test's client shares its
        # event loop with the server and the emitter) gets progress coalesced, as it should.
        assert_gap_free(got)
        assert got[-1]["seq"] == 303 and got[-1]["state"] == "SUCCESS" and got[-1]["result"] == 300
    direct = _metric(text, "jobwire_direct_writes_total")
    delivered = _metric(text, 'jobwire_deliveries_total{transport="websocket"}')
    assert delivered >= sum(map(len, streams))  # and the dashboard's
    # Live progress goes direct; the replayed history, and the final event of the
    # single-job socket, go through the writer (and anything queued while a reader lagged).
    assert direct >= delivered / 2, f"only {direct} of {delivered} deliveries were written directly"


async def test_a_socket_of_another_server_is_not_written_directly() -> None:
    """Only uvicorn's websockets-sansio protocol is known: anything else gets the ASGI path."""

    async def send(message: dict[str, object]) -> None:  # an ASGI send of some other server
        pass

    assert frame_writer(send, Tally()) is None


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70001])
def test_ready_made_frames_are_what_websockets_would_send(length: int) -> None:
    """Every length encoding of RFC 6455 (7, 16 and 64 bits), with multi-byte characters."""
    text = "é" * (length // 2) + "a" * (length % 2)
    assert ws_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


async def test_direct_writes_skip_nothing_and_repeat_nothing(own_redis: RedisServer) -> None:
    """A live event that repeats one already sent, or jumps past one never seen, is not
    written directly: the duplicate is dropped, the jump is checked against history."""
    settings = settings_for(own_redis.url)
    client = own_redis.client()
    recorder = Recorder(client, settings)
    recorder.record("strict", "PENDING")
    recorder.record("strict", "STARTED")
    async with run_server(settings) as srv, websockets.connect(f"{srv.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["strict"]}))
        events = await until_subscribed(ws, "strict")
        second = orjson.loads(client.zrange(settings.keys.history("strict"), 1, 1)[0])
        channel = settings.keys.job_channel("strict")
        client.publish(channel, orjson.dumps(second))  # seq 2 again
        client.publish(channel, orjson.dumps({**second, "seq": 5}))  # seq 5, never recorded
        recorder.record("strict", "SUCCESS", result="ok")  # seq 3
        while not events[-1]["final"]:
            msg = await recv_json(ws, 10)
            if msg["type"] == "event":
                events.append(msg)
    assert [e["seq"] for e in events] == [1, 2, 3]
