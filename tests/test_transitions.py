"""Every transition reaches every client, on every endpoint: slow readers of a burst with
many state changes (`/ws`, `/ws/jobs/{id}`, both SSE endpoints, the all-jobs stream), and
late joiners replaying a job's history, live and ended. The first event of each state and
the final event keep their places; only progress is coalesced, and counted."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import websockets

from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free
from tests.support import RedisServer, run_server, settings_for, wait_until

STATES = [f"STEP{i}" for i in range(12)]
PER_STATE = 60
RCVBUF = 4096  # a reader's socket buffer: small, so its backlog waits in jobwire's queue


def _record_burst(recorder: Recorder, job: str) -> None:
    for state in STATES:
        for n in range(PER_STATE):
            recorder.record(job, state, progress={"n": n})
    recorder.record(job, "SUCCESS", result=None)


def _must(events_total: int) -> list[int]:
    """The seqs that must arrive: PENDING (1), the first of each state, the final one."""
    firsts = [2 + i * PER_STATE for i in range(len(STATES))]
    return [1, *firsts, events_total]


def _socket(port: int, rcvbuf: int | None) -> socket.socket:
    """A connected socket; with `rcvbuf`, a small receive buffer."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _slow_ws(
    port: int, path: str, first: dict[str, Any] | None, pace: float | None, stop: Any
) -> list[dict[str, Any]]:
    """A websocket reader taking `pace` frames a second through a small socket buffer
    (with no `pace`: as fast as it can, through an ordinary one)."""
    got: list[dict[str, Any]] = []
    async with websockets.connect(
        f"ws://127.0.0.1:{port}{path}",
        sock=_socket(port, RCVBUF if pace else None),
        max_queue=1 if pace else 16,
        close_timeout=1,
    ) as ws:
        if first is not None:
            await ws.send(json.dumps(first))
        try:
            async for text in ws:
                msg = json.loads(text)
                if msg["type"] == "event":
                    got.append(msg)
                    if stop(msg):
                        return got
                if pace:
                    await asyncio.sleep(1 / pace)  # the reader's pace, not a wait
        except websockets.ConnectionClosed:
            pass
    return got


async def _slow_sse(port: int, path: str, pace: float | None, stop: Any) -> list[dict[str, Any]]:
    """An SSE reader (a plain HTTP/1.1 GET) taking `pace` events a second through a small
    socket buffer."""
    reader, writer = await asyncio.open_connection(sock=_socket(port, RCVBUF if pace else None))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    got: list[dict[str, Any]] = []
    try:
        while (await reader.readline()).strip():
            pass  # the response's head
        fields: dict[str, str] = {}
        while line := await reader.readline():
            text = line.decode().rstrip("\r\n")
            if ":" in text and not text.startswith(":"):
                name, _, value = text.partition(":")
                fields[name] = value.strip()
            elif not text.strip() and "data" in fields:  # a message ends (chunk sizes are skipped)
                if fields.get("event", "message") == "message":
                    got.append(json.loads(fields["data"]))
                    if stop(got[-1]):
                        return got
                    if pace:
                        await asyncio.sleep(1 / pace)  # the reader's pace
                fields = {}
    finally:
        writer.close()
    return got


def _check(name: str, events: list[dict[str, Any]], must: list[int]) -> int:
    seqs = [e["seq"] for e in events]
    assert [s for s in seqs if s in must] == must, (name, [s for s in must if s not in seqs])
    for e in events:  # no transition hidden in a coalesced count
        assert not set(range(e["seq"] - e.get("coalesced", 0), e["seq"])) & set(must), (name, e)
    assert_gap_free(events)
    return sum(e.get("coalesced", 0) for e in events)


async def test_slow_readers_get_every_transition_on_every_endpoint(own_redis: RedisServer) -> None:
    settings = settings_for(own_redis.url, socket_send_buffer=4096)
    recorder = Recorder(own_redis.client(), settings)
    job = "burst"
    recorder.record(job, "PENDING", task="demo")
    total = 1 + len(STATES) * PER_STATE + 1
    final = lambda msg: msg.get("job_id") == job and msg.get("final")  # noqa: E731
    async with run_server(settings) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        readers = {
            "/ws": _slow_ws(port, "/ws", {"op": "subscribe", "job_ids": [job]}, 400, final),
            "/ws/jobs": _slow_ws(port, f"/ws/jobs/{job}", None, 400, final),
            "SSE job": _slow_sse(port, f"/api/v1/jobs/{job}/events", 400, final),
            "SSE multi": _slow_sse(port, f"/api/v1/events?job={job}", 400, final),
            "all-jobs": _slow_ws(port, "/ws", {"op": "subscribe_all"}, 400, final),
        }
        tasks = {name: asyncio.create_task(coro) for name, coro in readers.items()}
        channel = settings.keys.job_channel(job)
        hub = srv.services.hub
        await wait_until(
            lambda: hub.subscribers(channel) == 4 and hub.subscribers(settings.keys.all_channel) == 1,
            what="every reader follows the job",
        )
        await asyncio.to_thread(_record_burst, recorder, job)
        results = {name: await asyncio.wait_for(task, 60) for name, task in tasks.items()}
    coalesced = 0
    for name, events in results.items():
        must = _must(total) if name != "all-jobs" else _must(total)[1:]  # it joined after PENDING
        events = events if name != "all-jobs" else [e for e in events if e["job_id"] == job]
        if name == "all-jobs":
            assert all(e.get("stream") == "all" for e in events)
            assert_gap_free(events, first=2)
        coalesced += _check(name, events, must) if name != "all-jobs" else 0
        if name == "all-jobs":
            seqs = [e["seq"] for e in events]
            assert [s for s in seqs if s in must] == must, [s for s in must if s not in seqs]
    assert coalesced > 0, "the readers were slow enough for progress to be coalesced"


@pytest.mark.parametrize("ended", [False, True], ids=["live", "ended"])
async def test_a_late_joiner_skips_no_transition(own_redis: RedisServer, ended: bool) -> None:
    """A job with PENDING, 500 PROGRESS events (and SUCCESS); a fast client from `since=0`
    on every endpoint gets seq 2, the PENDING → PROGRESS transition."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    job = f"late-{'ended' if ended else 'live'}"
    recorder.record(job, "PENDING", task="demo")
    for n in range(500):
        recorder.record(job, "PROGRESS", progress={"n": n})
    if ended:
        recorder.record(job, "SUCCESS", result=None)
    must = [1, 2, 502] if ended else [1, 2]
    async with run_server(settings) as srv:
        port = int(srv.url.rsplit(":", 1)[1])

        def enough(msg: dict[str, Any]) -> bool:
            return msg.get("job_id") == job and msg["seq"] >= must[-1] and (msg["final"] or not ended)

        def live_enough(msg: dict[str, Any]) -> bool:
            return msg.get("job_id") == job and msg["seq"] >= 501

        stop = enough if ended else live_enough
        results = {
            "/ws": await _slow_ws(port, "/ws", {"op": "subscribe", "job_ids": [job]}, None, stop),
            "/ws/jobs": await _slow_ws(port, f"/ws/jobs/{job}", None, None, stop),
            "SSE job": await _slow_sse(port, f"/api/v1/jobs/{job}/events", None, stop),
            "SSE multi": await _slow_sse(port, f"/api/v1/events?job={job}", None, stop),
        }
    for name, events in results.items():
        seqs = [e["seq"] for e in events]
        assert [s for s in seqs if s in must] == must, (name, seqs[:4])
        assert_gap_free(events)
