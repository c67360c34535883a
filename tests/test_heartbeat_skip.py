"""Heartbeats only where the socket is quiet (issue 20, candidate 6): events written
straight to the socket do not wake its writer, so its idle timer alone would send a
heartbeat every `heartbeat_interval` to a client that had events all along. A client
whose events keep coming gets none; an idle one still gets one every interval, and a
client whose events stop gets one within the interval, since clients' watchdogs count
the silence."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import websockets

from jobwire.tasks.recorder import Recorder
from tests.clients import recv_json, until_subscribed
from tests.support import RedisServer, run_server, settings_for

INTERVAL = 1.0


async def _subscribed(url: str, job_id: str) -> Any:
    ws = await websockets.connect(f"{url}/ws")
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
    await until_subscribed(ws, job_id)
    return ws


async def test_a_socket_getting_events_gets_no_heartbeat_and_an_idle_one_does(own_redis: RedisServer) -> None:
    settings = settings_for(own_redis.url, heartbeat_interval=INTERVAL)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("busy", "STARTED")
    recorder.record("quiet", "STARTED")
    async with run_server(settings) as srv:
        busy = await _subscribed(srv.ws_url, "busy")
        quiet = await _subscribed(srv.ws_url, "quiet")
        quiet_beats: list[float] = []

        async def watch_quiet() -> None:
            while True:
                msg = await recv_json(quiet, 3 * INTERVAL)
                assert msg["type"] == "heartbeat", msg
                quiet_beats.append(time.monotonic())

        watching = asyncio.create_task(watch_quiet())
        busy_types: list[str] = []
        try:
            # Events on `busy`, each once the last has arrived (written directly: the
            # socket keeps up), until the idle socket has had three heartbeats.
            i = 0
            while len(quiet_beats) < 3:
                assert not watching.done(), watching
                i += 1
                await asyncio.to_thread(recorder.record, "busy", "WORKING", progress={"i": i})
                while True:
                    msg = await recv_json(busy, 3 * INTERVAL)
                    busy_types.append(msg["type"])
                    if msg["type"] == "event" and msg["progress"] == {"i": i}:
                        break
            # The events stop: the heartbeat comes within the interval (and a half's slack).
            stopped = time.monotonic()
            msg = await recv_json(busy, 1.5 * INTERVAL)
            assert msg["type"] == "heartbeat" and time.monotonic() - stopped < 1.5 * INTERVAL
        finally:
            watching.cancel()
            await busy.close()
            await quiet.close()
    assert "heartbeat" not in busy_types, busy_types
    assert i > 10 and set(busy_types) == {"event"}
    # The idle socket: one every interval, none skipped (a scheduling delay's slack).
    gaps = [b - a for a, b in zip(quiet_beats, quiet_beats[1:], strict=False)]
    assert all(gap < 1.5 * INTERVAL for gap in gaps), gaps
