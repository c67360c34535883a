"""A real job, watched over every transport, shows every transition in order."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import websockets

from tests.clients import LIFECYCLE, assert_gap_free, submit, watch_ws
from tests.support import RunningServer, run_server


async def test_ws_multi_sees_whole_lifecycle(server: RunningServer) -> None:
    """/ws: PENDING → STARTED → VALIDATING → PROCESSING → UPLOADING → SUCCESS, gap-free, with result."""
    job_id = await submit(server.url, delay=0.1)
    events = await watch_ws(server.ws_url, job_id)
    assert [e["state"] for e in events] == LIFECYCLE
    assert_gap_free(events)
    assert events[-1]["final"] is True
    assert events[-1]["result"]["status"] == "done"
    assert events[3]["progress"] == {
        "step": 2,
        "total": 3,
        "percent": 66.67,
        "description": "Processing data",
    }
    assert all(isinstance(e["ts"], float) for e in events)


async def test_ws_single_job_closes_1000_after_final(server: RunningServer) -> None:
    """/ws/jobs/{id} streams the job then closes with 1000."""
    job_id = await submit(server.url, delay=0.1)
    events = []
    async with websockets.connect(f"{server.ws_url}/ws/jobs/{job_id}") as ws:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "event":
                events.append(msg)
        assert ws.close_code == 1000
    assert [e["state"] for e in events] == LIFECYCLE
    assert_gap_free(events)


async def test_sse_streams_lifecycle_and_ends(server: RunningServer) -> None:
    """SSE: id: is the seq, data: the event; the stream ends after the final event."""
    job_id = await submit(server.url, delay=0.1)
    events, ids = [], []
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
        async with http.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("id: "):
                    ids.append(line[4:])
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert [e["state"] for e in events] == LIFECYCLE
    assert ids == [f"{e['epoch']}:{e['seq']}" for e in events]  # what EventSource resumes from
    assert [e["seq"] for e in events] == list(range(1, 7))


async def test_sse_resumes_from_last_event_id(server: RunningServer) -> None:
    """SSE with Last-Event-ID: 3 gets exactly seq 4..6; after the final event, 204 stops EventSource."""
    job_id = await submit(server.url, delay=0.05)
    await watch_ws(server.ws_url, job_id)  # let it finish
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
        resp = await http.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "3"})
        seqs = [
            int(line[4:].rpartition(":")[2]) for line in resp.text.splitlines() if line.startswith("id: ")
        ]
        assert seqs == [4, 5, 6]
        done = await http.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "6"})
        assert done.status_code == 204


async def test_polling_history_sees_every_transition(server: RunningServer) -> None:
    """Polling /history?since=N collects the whole lifecycle; GET status ends on SUCCESS with the result."""
    job_id = await submit(server.url, delay=0.1)
    events: list[dict] = []
    async with httpx.AsyncClient(base_url=server.url) as http:
        for _ in range(200):
            since = events[-1]["seq"] if events else 0
            resp = await http.get(f"/api/v1/jobs/{job_id}/history", params={"since": since})
            assert resp.status_code == 200
            events += resp.json()["events"]
            if events and events[-1]["final"]:
                break
            await asyncio.sleep(0.05)
        status = (await http.get(f"/api/v1/jobs/{job_id}")).json()
    assert [e["state"] for e in events] == LIFECYCLE
    assert_gap_free(events)
    assert status["status"] == "SUCCESS" and status["seq"] == 6
    assert status["result"]["status"] == "done"
    assert status["progress"]["percent"] == 100.0  # the last update_state: step 3 of 3
    assert "error" not in status


async def test_multiplexed_sse_resumes_per_job_and_reports_unknown(server: RunningServer) -> None:
    """/api/v1/events: several jobs on one stream, each from its own since; unknown ids as control errors."""
    a = await submit(server.url, delay=0.01)
    b = await submit(server.url, delay=0.01)
    await watch_ws(server.ws_url, a)
    await watch_ws(server.ws_url, b)
    params = [("job", a), ("job", b), ("job", "never-seen"), ("since", f"{a}:4")]
    events: dict[str, list[int]] = {a: [], b: []}
    controls = []
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
        async with http.stream("GET", "/api/v1/events", params=params) as resp:
            assert resp.status_code == 200
            kind = "message"
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    doc = json.loads(line[6:])
                    if kind == "control":
                        controls.append(doc)
                    else:
                        events[doc["job_id"]].append(doc["seq"])
                    kind = "message"
    # Both jobs had ended: after their events the stream says `end` and closes by itself.
    assert events == {a: [5, 6], b: [1, 2, 3, 4, 5, 6]}
    assert controls[0]["code"] == "job_not_found" and controls[0]["job_id"] == "never-seen"
    assert controls[-1] == {"type": "end"}


async def read_sse(resp: httpx.Response) -> list[tuple[str, dict]]:
    """Every (event kind, data) of an SSE response, until the server ends it."""
    out, kind = [], "message"
    async for line in resp.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
            kind = "message"
    return out


async def test_multiplexed_sse_with_nothing_to_follow_ends(server: RunningServer) -> None:
    """Only unknown ids: the stream says so, then `end`, and closes (no stream of keepalives),
    holding no hub subscription."""
    hub, keys = server.services.hub, server.services.settings.keys
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        async with http.stream(
            "GET", "/api/v1/events", params=[("job", "never-1"), ("job", "never-2")]
        ) as resp:
            assert resp.status_code == 200
            messages = await read_sse(resp)
    assert [(k, d.get("code") or d["type"]) for k, d in messages] == [
        ("control", "job_not_found"),
        ("control", "end"),
    ]
    assert messages[0][1]["job_ids"] == ["never-1", "never-2"]  # one notice for many unknown ids
    assert hub.subscribers(keys.job_channel("never-1")) == 0


async def test_multiplexed_sse_redis_error_leaves_no_subscription(server: RunningServer, rclient) -> None:  # type: ignore[no-untyped-def]
    """A Redis error while the stream opens (WRONGTYPE on the history key) answers an error
    (a server fault, not "Redis unreachable") and releases the hub subscription it had taken."""
    keys = server.services.settings.keys
    live = await submit(server.url, "report_steps", steps=3, delay=0.5)
    broken = f"broken-{uuid.uuid4()}"
    rclient.hset(keys.job(broken), mapping={"state": "PENDING", "seq": 1, "created": 1.0})
    rclient.set(keys.history(broken), "not a sorted set")
    hub = server.services.hub
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            resp = await http.get("/api/v1/events", params=[("job", live), ("job", broken)])
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
        assert hub.subscribers(keys.job_channel(live)) == 0
        assert hub.subscribers(keys.job_channel(broken)) == 0
    finally:
        rclient.delete(keys.job(broken), keys.history(broken))


async def test_transports_can_be_turned_off(settings, worker) -> None:  # type: ignore[no-untyped-def]
    """JOBWIRE_TRANSPORTS without websocket refuses the upgrade (403); without sse, SSE is 503."""

    async with run_server(settings.model_copy(update=dict(transports=("polling",)))) as srv:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(f"{srv.ws_url}/ws"):
                pass
        assert refused.value.response.status_code == 403
        async with httpx.AsyncClient(base_url=srv.url) as http:
            resp = await http.get("/api/v1/events")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "transport_disabled"
