"""Bad input gets a clear error and breaks nothing: websocket messages, close codes, REST bodies."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from jobwire.settings import DEFAULT_TASKS, Settings
from tests.clients import next_of, recv_json, submit, watch_ws
from tests.support import RunningServer, run_server


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('{"op": "explode"}', "unknown_op"),
        ('{"op": "subscribe"}', "invalid_request"),
        ('{"op": "subscribe", "job_ids": "abc"}', "invalid_request"),
        ('{"op": "subscribe", "job_ids": ["has\\u0000nul"]}', "invalid_job_id"),
        ('{"op": "subscribe", "job_ids": ["a"], "since": {"a": -1}}', "invalid_request"),
        ('{"op": "subscribe", "job_ids": ["a"], "since": [1]}', "invalid_request"),
    ],
)
async def test_malformed_ws_message_gets_error_and_socket_lives(
    server: RunningServer, message: str, code: str
) -> None:
    """Each malformed message gets {"type": "error", "code"}; the socket then still works."""
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(message)
        err = await next_of(ws, "error")
        assert err["code"] == code and err["message"]
        await ws.send(json.dumps({"op": "ping"}))
        assert (await next_of(ws, "pong"))["type"] == "pong"


async def test_binary_frame_gets_error(server: RunningServer) -> None:
    """Binary frames are refused with an error message, not a crash."""
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(b"\x00\x01")
        assert (await next_of(ws, "error"))["code"] == "invalid_message"


async def test_subscribe_unknown_job_errors_and_others_still_stream(server: RunningServer) -> None:
    """Unknown ids get job_not_found; known ids in the same message are served."""
    job_id = await submit(server.url, delay=0.01)
    await watch_ws(server.ws_url, job_id)
    missing = f"missing-{uuid.uuid4()}"
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [missing, job_id]}))
        seen = {"error": None, "final": None}
        while seen["error"] is None or seen["final"] is None:
            msg = await next_of(ws, "error", "event")
            if msg["type"] == "error":
                assert msg["code"] == "job_not_found" and msg["job_id"] == missing
                seen["error"] = msg
            elif msg["final"]:
                seen["final"] = msg
        await ws.send(json.dumps({"op": "unsubscribe", "job_ids": [job_id]}))
        assert (await next_of(ws, "unsubscribed"))["job_ids"] == [job_id]


async def test_too_many_jobs_per_socket(settings: Settings, worker: object) -> None:
    """Past max_jobs_per_socket, a further subscription gets too_many_jobs; the rest stream."""
    async with run_server(settings.model_copy(update=dict(max_jobs_per_socket=1))) as srv:
        ids = [await submit(srv.url, delay=0.01) for _ in range(2)]
        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ids}))
            err = await next_of(ws, "error")
            assert err["code"] == "too_many_jobs" and err["job_id"] in ids


@pytest.mark.parametrize(
    ("path", "close_code"),
    [
        ("/ws/jobs/never-submitted-id", 4404),
        ("/ws/jobs/some-id?since=-3", 4400),
        ("/ws/jobs/some-id?since=abc", 4400),
    ],
)
async def test_single_job_socket_close_codes(server: RunningServer, path: str, close_code: int) -> None:
    """/ws/jobs/{id} closes with 4404 for unknown jobs and 4400 for a bad since, with a reason."""
    async with websockets.connect(f"{server.ws_url}{path}") as ws:
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
    assert ws.close_code == close_code
    assert ws.close_reason


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "invalid_json"),
        (b"[]", 422, "invalid_request"),
        (b'{"task": "celery.backend_cleanup"}', 422, "task_not_allowed"),
        (b'{"task": "long_running_task", "args": {}}', 422, "invalid_request"),
        (b'{"task": "long_running_task", "kwargs": []}', 422, "invalid_request"),
        (b'{"task": "long_running_task", "queue": "x"}', 422, "invalid_request"),
        (
            b'{"task": "long_running_task", "kwargs": {"pad": "' + b"x" * (1 << 20) + b'"}}',
            413,
            "payload_too_large",
        ),
    ],
)
async def test_submit_rejects_bad_bodies(server: RunningServer, body: bytes, status: int, code: str) -> None:
    """POST /api/v1/jobs validates the body and never submits an unlisted task."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/api/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code


async def test_tasks_listing_and_health(server: RunningServer) -> None:
    """GET /api/v1/tasks lists the allow-list with descriptions; /healthz and /readyz answer."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        tasks = (await http.get("/api/v1/tasks")).json()["tasks"]
        assert tuple(t["name"] for t in tasks) == DEFAULT_TASKS
        assert all(t["description"] for t in tasks)
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "redis": True, "hub": "ok"}
        unknown = await http.get("/api/v1/nope")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


async def test_idle_socket_gets_welcome_then_heartbeats(settings: Settings, worker: object) -> None:
    """/ws says how often it will speak, then sends a heartbeat whenever idle that long."""
    async with run_server(settings.model_copy(update=dict(heartbeat_interval=0.3))) as srv:
        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
            assert await recv_json(ws) == {"type": "welcome", "heartbeat": 0.3}
            beats = [await recv_json(ws, timeout=1.0) for _ in range(2)]
    assert [b["type"] for b in beats] == ["heartbeat", "heartbeat"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "body must be an object: {task?, args?, kwargs?, group?, callback?}"),
        ({}, 'send either "task" (one job) or "group" (a group or chord), not both'),
        (
            {"task": "plain_sum", "group": [{"task": "plain_sum"}]},
            'send either "task" (one job) or "group" (a group or chord), not both',
        ),
        ({"group": []}, "group: List should have at least 1 item after validation, not 0"),
        ({"group": [{"task": "plain_sum"}, {"task": 3}]}, "group[1].task: Input should be a valid string"),
        (
            {"task": "plain_sum", "callback": {"task": "plain_sum"}},
            '"callback" needs a "group" (it makes a chord)',
        ),
        ({"task": 5}, "task must be a task name (string), got int"),
        ({"task": ""}, "task must be a task name (string)"),
        ({"task": "long_running_task", "args": {}}, "args must be a list, got dict"),
        ({"task": "long_running_task", "kwargs": []}, "kwargs must be an object, got list"),
        ({"task": "long_running_task", "queue": "x", "eta": 1}, "unknown fields: eta, queue"),
    ],
)
async def test_submit_errors_say_what_is_wrong(server: RunningServer, body: object, message: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/api/v1/jobs", json=body)
    assert resp.status_code == 422
    assert resp.json() == {"error": {"code": "invalid_request", "message": message}}


async def test_oversized_frame_and_header_are_refused(server: RunningServer) -> None:
    """A websocket frame past JOBWIRE_MAX_FRAME_BYTES closes with 1009; a request head past
    JOBWIRE_MAX_HEADER_BYTES is refused without reaching the app."""
    limit = server.services.settings.max_frame_bytes
    async with websockets.connect(f"{server.ws_url}/ws", max_size=None) as ws:
        await ws.send(json.dumps({"op": "ping", "pad": "x" * (limit + 10)}))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await ws.recv()
    assert ws.close_code == 1009
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.get(
            "/api/v1/jobs", headers={"x-pad": "y" * (2 * server.services.settings.max_header_bytes)}
        )
    assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large"
