"""Each class of input the fuzz pass once answered with a 5xx, a dropped socket or a lie,
by name. Every one now gets a clear 4xx or close code, and changes nothing stored."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.clients import next_of, submit, watch_ws
from tests.support import RunningServer, run_server

UNICODE_DIGIT = "\u00b2"  # '²': str.isdigit() says yes, int() says no
LONG_DIGITS = ["9" * 20, "1" * 1000, "7" * 6000]


async def _finished_job(server: RunningServer) -> str:
    job_id = await submit(server.url, delay=0.01)
    await watch_ws(server.ws_url, job_id)
    return job_id


@pytest.mark.parametrize("since", [UNICODE_DIGIT, *LONG_DIGITS, "-1", "1e3"])
async def test_bad_since_is_422_everywhere(server: RunningServer, since: str) -> None:
    job_id = await _finished_job(server)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for path, params, headers in [
            (f"/api/v1/jobs/{job_id}/history", {"since": since}, {}),
            (f"/api/v1/jobs/{job_id}/events", {"since": since}, {}),
            (f"/api/v1/jobs/{job_id}/events", {}, {"Last-Event-ID": since.encode()}),
            ("/api/v1/events", {"job": job_id, "since": f"{job_id}:{since}"}, {}),
        ]:
            resp = await http.get(path, params=params, headers=headers)
            assert resp.status_code == 422, (path, resp.status_code, resp.text[:200])
            assert resp.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("since", [UNICODE_DIGIT, LONG_DIGITS[0], LONG_DIGITS[1]])
async def test_bad_since_on_websockets_gets_a_reason(server: RunningServer, since: str) -> None:
    job_id = await _finished_job(server)
    async with websockets.connect(f"{server.ws_url}/ws/jobs/{job_id}?since={since}") as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4400 and "since" in ws.close_reason
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id], "since": {job_id: since}}))
        error = await next_of(ws, "error")
        assert error["code"] == "invalid_request"
        await ws.send(json.dumps({"op": "ping"}))
        assert (await next_of(ws, "pong"))["type"] == "pong"  # the socket lives on


async def test_ids_that_look_like_another_jobs_keys(server: RunningServer) -> None:
    """`<id>:events` is just an unknown id (404, UNKNOWN, 4404), never "Redis unreachable";
    ids with braces are ids like any other; control characters are refused as malformed."""
    job_id = await _finished_job(server)
    twin = f"{job_id}:events"
    async with httpx.AsyncClient(base_url=server.url) as http:
        for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/history"), ("GET", "/events")]:
            resp = await http.request(method, f"/api/v1/jobs/{twin}{path}")
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found", (method, path)
        batch = await http.post("/api/v1/jobs/batch-status", json={"job_ids": [job_id, twin]})
        assert batch.status_code == 200
        assert batch.json()["jobs"][twin]["status"] == "UNKNOWN"
        assert batch.json()["jobs"][job_id]["status"] == "SUCCESS"
        braces = await http.get(f"/api/v1/jobs/{job_id}%7D:events")
        assert braces.status_code == 404 and braces.json()["error"]["code"] == "job_not_found"
        control = await http.get("/api/v1/jobs/a%01b")
        assert control.status_code == 422 and control.json()["error"]["code"] == "invalid_job_id"
    async with websockets.connect(f"{server.ws_url}/ws/jobs/{twin}") as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4404


@pytest.mark.parametrize("before", ["NaN", "nan", "inf", "-inf", "-1", "1e400", "x"])
async def test_bad_listing_cursor_is_422(server: RunningServer, before: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.get("/api/v1/jobs", params={"before": before})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_request"


async def test_deeply_nested_arguments_leave_no_orphan_job(server: RunningServer, rclient) -> None:  # type: ignore[no-untyped-def]
    keys = server.services.settings.keys
    listed = rclient.zcard(keys.recent)
    nested = b"[" * 1000 + b"0" + b"]" * 1000
    body = b'{"task": "long_running_task", "kwargs": {"data": ' + nested + b"}}"
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/api/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["error"]["message"] == "kwargs is nested deeper than 32 levels"
    assert rclient.zcard(keys.recent) == listed


async def test_failed_submit_leaves_no_orphan_job(settings, worker, rclient) -> None:  # type: ignore[no-untyped-def]
    """The broker refuses the message after PENDING was recorded at publish: 503, and the
    job is gone again (not listed, not readable), where it once stayed PENDING for 24 h."""

    keys = settings.keys
    before = set(rclient.zrange(keys.recent, 0, -1))
    async with run_server(settings.model_copy(update=dict(broker_url="redis://127.0.0.1:1/0"))) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            resp = await http.post("/api/v1/jobs", json={"task": "long_running_task"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "broker_unavailable"
    assert set(rclient.zrange(keys.recent, 0, -1)) == before
