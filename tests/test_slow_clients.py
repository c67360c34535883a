"""Readers slower than the job: every transition and final event arrives, in order, with
the newest progress; a client that stops reading is closed (1013) and resumes by seq."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest
import redis
import websockets

from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free, transitions, ws_job_events
from tests.support import RedisServer, run_server, settings_for, wait_until

PHASES, STEPS = 100, 1000  # 100,000 progress events in 100 states, then SUCCESS


def _record_burst(recorder: Recorder, job_id: str) -> None:
    for phase in range(PHASES):
        with recorder.client.pipeline(transaction=False) as pipe:
            for step in range(STEPS):
                recorder.record(job_id, f"PHASE-{phase}", progress={"step": step}, pipe=pipe)
            pipe.execute()
    recorder.record(job_id, "SUCCESS", result={"phases": PHASES})


async def _read_ws(url: str, frames_per_second: float | None) -> list[dict[str, Any]]:
    """A /ws/jobs reader taking at most `frames_per_second` (None: as fast as it can)."""
    return await ws_job_events(url, frames_per_second=frames_per_second, max_queue=4)


async def _read_sse(url: str, frames_per_second: float) -> list[dict[str, Any]]:
    events = []
    async with httpx.AsyncClient(timeout=120) as http, http.stream("GET", url) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["final"]:
                    break
                await asyncio.sleep(1 / frames_per_second)  # the reader's pace, not a wait
    return events


def _check(events: list[dict[str, Any]]) -> None:
    assert transitions(events) == ["PENDING"] + [f"PHASE-{p}" for p in range(PHASES)] + ["SUCCESS"]
    assert_gap_free(events)
    # The newest progress of every state arrives, so each phase ends on its last step.
    last_of = {e["state"]: e["progress"] for e in events if e["state"].startswith("PHASE-")}
    assert all(progress == {"step": STEPS - 1} for progress in last_of.values())


async def test_burst_of_100000_events_reaches_readers_of_every_speed(own_redis: RedisServer) -> None:
    settings = settings_for(own_redis.url)
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    recorder.record("burst", "PENDING")
    async with run_server(settings) as srv:
        url = f"{srv.ws_url}/ws/jobs/burst"
        readers = [
            asyncio.create_task(_read_ws(url, None)),
            asyncio.create_task(_read_ws(url, 2000)),
            asyncio.create_task(_read_ws(url, 200)),
            asyncio.create_task(_read_sse(f"{srv.url}/api/v1/jobs/burst/events", 500)),
        ]
        await wait_until(lambda: srv.services.hub.subscribers("jobwire:{burst}:live") == 4, what="4 readers")
        await asyncio.to_thread(_record_burst, recorder, "burst")
        results = await asyncio.wait_for(asyncio.gather(*readers), 120)
        coalesced = srv.services.metrics.coalesced._value.get()
    for events in results:
        _check(events)
    # The slowest readers could not have taken 100,002 frames: coalescing is what kept them.
    assert len(results[2]) < 20_000 and coalesced > 80_000


def _small_window_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer, so a client that stops reading stalls
    the server's sends quickly instead of after megabytes of kernel buffering."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


@pytest.mark.parametrize("limit", ["bytes", "time"])
async def test_stalled_client_is_closed_1013_and_resumes_by_seq(own_redis: RedisServer, limit: str) -> None:
    """A client that stops reading is closed with 1013 and a reason, by the byte limit on
    its queue or by the stall timeout; a healthy client on the same job is unaffected, and
    the stalled one, back, resumes from its last seq and gets every transition."""
    if limit == "bytes":
        settings = settings_for(own_redis.url, send_buffer_bytes=16 * 1024, stall_timeout=600)
    else:
        settings = settings_for(own_redis.url, send_buffer_bytes=1 << 30, stall_timeout=1.0)
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    recorder.record("stall", "PENDING")
    pad = "x" * 2000
    async with run_server(settings) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        healthy = asyncio.create_task(_read_ws(f"{srv.ws_url}/ws/jobs/stall", None))
        stalled = await websockets.connect(
            f"{srv.ws_url}/ws/jobs/stall", sock=_small_window_socket(port), max_queue=1
        )
        await wait_until(lambda: srv.services.hub.subscribers("jobwire:{stall}:live") == 2, what="2 readers")
        closed = srv.services.metrics.slow_closed.labels("websocket")
        step = 0
        while closed._value.get() == 0:  # transitions (never coalesced) until jobwire gives up
            progress = {"pad": pad, "n": step}
            await asyncio.to_thread(recorder.record, "stall", f"S{step % 2}", progress=progress)
            step += 1
            assert step < 20_000, "the stalled client was never closed"
            # A pace a healthy reader sharing this event loop keeps up with, even on a busy
            # machine (as a burst, the healthy one could be the first past 16 KiB); slower
            # while the stall timer runs.
            await asyncio.sleep(0.01 if limit == "time" else 0.002)
        recorder.record("stall", "SUCCESS", result=step)
        seen = []
        with pytest.raises(websockets.ConnectionClosed):
            async for text in stalled:  # reading again: what was sent, then the close
                msg = json.loads(text)
                if msg["type"] == "event":
                    seen.append(msg)
        assert stalled.close_code == 1013 and "too slow" in stalled.close_reason
        assert_gap_free(seen)
        # A client may be closed before it got anything (events burst in before its writer
        # ran, past a 16 KiB limit): it resumes from 0 then.
        since = seen[-1]["seq"] if seen else 0
        rest = await _read_ws(f"{srv.ws_url}/ws/jobs/stall?since={since}", None)
        events = seen + rest
        assert_gap_free(events)
        assert transitions(events)[-1] == "SUCCESS" and len(events) == step + 2
        healthy_events = await asyncio.wait_for(healthy, 30)
        assert [e["seq"] for e in healthy_events] == list(range(1, step + 3))
