"""Reconnecting clients get exactly what they missed; late subscribers get the final state."""

from __future__ import annotations

import json

import websockets

from tests.clients import LIFECYCLE, assert_gap_free, events_until_final, next_of, submit, watch_ws
from tests.support import RunningServer


async def test_reconnect_with_since_gets_exactly_the_missed_events(server: RunningServer) -> None:
    """Disconnect after VALIDATING, reconnect with since=3: receive 4..6 only, no duplicates."""
    job_id = await submit(server.url, delay=0.3)
    seen = []
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
        while not seen or seen[-1]["seq"] < 3:
            msg = await next_of(ws, "event")
            seen.append(msg)
    # Missed while away: the rest of the job (it keeps running).
    rest = await watch_ws(server.ws_url, job_id, since=seen[-1]["seq"])
    combined = seen + rest
    assert [e["state"] for e in combined] == LIFECYCLE
    assert_gap_free(combined)


async def test_subscribe_after_finish_gets_history_and_final_state(server: RunningServer) -> None:
    """A client arriving after the job finished still sees the whole story, ending on SUCCESS."""
    job_id = await submit(server.url, delay=0.02)
    await watch_ws(server.ws_url, job_id)
    late = await watch_ws(server.ws_url, job_id)
    assert [e["state"] for e in late] == LIFECYCLE
    caught_up = await watch_ws(server.ws_url, job_id, since=5)
    assert [e["state"] for e in caught_up] == ["SUCCESS"]


async def test_subscribed_ack_follows_replayed_history(server: RunningServer) -> None:
    """The 'subscribed' ack comes after the replayed events and names the last seq sent."""
    job_id = await submit(server.url, delay=0.02)
    await watch_ws(server.ws_url, job_id)
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id], "since": {job_id: 2}}))
        got = [await next_of(ws, "event", "subscribed") for _ in range(5)]
    assert [m["type"] for m in got] == ["event"] * 4 + ["subscribed"]
    assert got[-1] == {"type": "subscribed", "job_id": job_id, "seq": 6}


async def test_one_socket_many_jobs(server: RunningServer) -> None:
    """One /ws socket watching three jobs gets each job's lifecycle complete and in order."""
    ids = [await submit(server.url, delay=0.05) for _ in range(3)]
    per_job: dict[str, list] = {i: [] for i in ids}
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ids}))
        while not all(evs and evs[-1]["final"] for evs in per_job.values()):
            msg = await next_of(ws, "event", timeout=20)
            per_job[msg["job_id"]].append(msg)
    for evs in per_job.values():
        assert [e["state"] for e in evs] == LIFECYCLE
        assert_gap_free(evs)


async def test_subscribe_all_sees_other_jobs(server: RunningServer) -> None:
    """subscribe_all delivers events of jobs the socket never named."""
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe_all"}))
        assert (await next_of(ws, "subscribed_all"))["type"] == "subscribed_all"
        job_id = await submit(server.url, delay=0.02)
        events = await events_until_final(ws, job_id)
    assert [e["state"] for e in events] == LIFECYCLE
    # Marked, so clients never mistake them for a subscribed job's ordered stream.
    assert all(e["stream"] == "all" for e in events)
