"""Lifecycle events from a real worker: failure, revoke, retry, and plain-Celery compatibility."""

from __future__ import annotations

import json
import uuid

import httpx
import redis
import websockets
from celery.result import AsyncResult

from jobwire.tasks.recorder import Recorder
from tests.clients import (
    assert_gap_free,
    events_until_final,
    events_until_state,
    next_of,
    submit,
    until_subscribed,
    watch_ws,
)
from tests.support import RunningServer, wait_until


def _scheduled(celery, job_id: str) -> bool:  # type: ignore[no-untyped-def]
    replies = celery.control.inspect(timeout=0.5).scheduled() or {}
    return any(entry["request"]["id"] == job_id for entries in replies.values() for entry in entries)


async def test_failing_task_reports_failure_type_and_message(server: RunningServer) -> None:
    """failing_task: PROCESSING then FAILURE with the exception's type and message, no traceback."""
    job_id = await submit(server.url, "failing_task", delay=0.05)
    events = await watch_ws(server.ws_url, job_id)
    assert [e["state"] for e in events] == ["PENDING", "STARTED", "PROCESSING", "FAILURE"]
    assert_gap_free(events)
    failure = events[-1]
    assert failure["final"] is True
    assert failure["error"] == {
        "type": "ValueError",
        "message": "Simulated failure: the input file is corrupt at row 42",
    }
    assert "traceback" not in json.dumps(failure).lower()
    async with httpx.AsyncClient(base_url=server.url) as http:
        status = (await http.get(f"/api/v1/jobs/{job_id}")).json()
    assert status["status"] == "FAILURE" and status["error"]["type"] == "ValueError"


async def test_revoke_running_job_reaches_every_watcher(server: RunningServer, worker) -> None:  # type: ignore[no-untyped-def]
    """DELETE on a running job: every watcher gets REVOKED as the final event; nothing follows it."""
    job_id = await submit(server.url, delay=1.0)
    sockets = [await websockets.connect(f"{server.ws_url}/ws") for _ in range(3)]
    try:
        for ws in sockets:
            await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
        replays = [await until_subscribed(ws, job_id) for ws in sockets]
        # Wait until the worker is inside the task.
        first = await events_until_state(sockets[0], job_id, "VALIDATING", replays[0])
        async with httpx.AsyncClient(base_url=server.url) as http:
            resp = await http.delete(f"/api/v1/jobs/{job_id}")
            assert resp.status_code == 202, resp.text
            assert resp.json()["status"] == "REVOKED"
            again = await http.delete(f"/api/v1/jobs/{job_id}")
            assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
        results = [await events_until_final(sockets[0], job_id, events=first)]
        results += [
            await events_until_final(ws, job_id, events=r)
            for ws, r in zip(sockets[1:], replays[1:], strict=True)
        ]
    finally:
        for ws in sockets:
            await ws.close()
    for events in results:
        assert events[-1]["state"] == "REVOKED" and events[-1]["final"] is True
        assert "SUCCESS" not in [e["state"] for e in events]
        assert_gap_free(events)
    # The worker terminated the task (SIGTERM); Celery's stored state says REVOKED too.
    await wait_until(
        lambda: f"Terminating {job_id}" in worker.log_path.read_text(), what="the worker terminates it"
    )
    assert AsyncResult(job_id, app=server.services.celery).state == "REVOKED"


async def test_reports_after_revoke_are_refused(server: RunningServer) -> None:
    """REVOKED recorded while the task runs, and no worker told (no SIGTERM): its next
    report() is refused (returns None, so it stops), and its SUCCESS is refused too."""

    celery = server.services.celery
    job_id = await submit(server.url, "report_steps", steps=50, delay=0.1)
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
        events = await events_until_state(ws, job_id, "WORKING", await until_subscribed(ws, job_id))
        error = {"type": "TaskRevokedError", "message": "revoked, no broadcast"}
        assert Recorder.for_app(celery).record(job_id, "REVOKED", error=error) is not None
        events = await events_until_final(ws, job_id, events=events)
    # The task saw report() refused and returned early; Celery stored what it returned.
    result = AsyncResult(job_id, app=celery)
    await wait_until(result.ready, what="the task returns")
    assert result.result["status"] == "cancelled" and result.result["steps"] < 50
    async with httpx.AsyncClient(base_url=server.url) as http:
        history = (await http.get(f"/api/v1/jobs/{job_id}/history")).json()["events"]
    assert history[-1]["state"] == "REVOKED" and events[-1]["state"] == "REVOKED"
    assert "SUCCESS" not in [e["state"] for e in history]


async def test_revoke_queued_job_never_runs(server: RunningServer, rclient: redis.Redis) -> None:
    """A job revoked while still queued is REVOKED at once and never STARTED."""
    celery = server.services.celery
    # Park it on a queue no worker consumes, so it is certainly still queued.
    result = celery.send_task("long_running_task", kwargs={"delay": 0.01}, queue=f"parked-{uuid.uuid4()}")
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get(f"/api/v1/jobs/{result.id}")).json()["status"] == "PENDING"
        assert (await http.delete(f"/api/v1/jobs/{result.id}")).status_code == 202
    events = await watch_ws(server.ws_url, result.id)
    assert [e["state"] for e in events] == ["PENDING", "REVOKED"]
    assert events[-1]["error"]["type"] == "TaskRevokedError"


async def test_retry_event_carries_countdown_and_eta(server: RunningServer) -> None:
    """retrying_task: RETRY (with reason, countdown, eta) comes before the retry's STARTED."""
    job_id = await submit(server.url, "retrying_task", delay=0.2, failures=1)
    events = await watch_ws(server.ws_url, job_id)
    states = [e["state"] for e in events]
    assert states == ["PENDING", "STARTED", "PROCESSING", "RETRY", "STARTED", "PROCESSING", "SUCCESS"]
    assert_gap_free(events)
    retry = events[3]
    assert retry["error"] == {"type": "ConnectionError", "message": "Upstream service unavailable"}
    assert retry["retry"]["attempt"] == 1
    assert 0 < retry["retry"]["countdown"] <= 0.2
    assert retry["retry"]["eta"]
    assert events[-1]["result"] == {"status": "done", "attempts": 2}


async def test_plain_celery_sees_custom_states_and_info(server: RunningServer) -> None:
    """AsyncResult(id).state/.info follow report() for code that knows nothing of jobwire."""
    job_id = await submit(server.url, delay=0.5)
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
        while True:
            msg = await next_of(ws, "event")
            if msg["state"] == "PROCESSING":
                break
        result = AsyncResult(job_id, app=server.services.celery)
        assert result.state == "PROCESSING"
        assert result.info == {"step": 2, "total": 3, "description": "Processing data"}  # as stored
        await events_until_final(ws, job_id, events=[msg])
    assert AsyncResult(job_id, app=server.services.celery).get(timeout=5)["status"] == "done"


async def test_job_sent_with_plain_celery_is_watchable_at_once(server: RunningServer) -> None:
    """A job sent with send_task/.delay() (not via the API) is PENDING before any worker sees it."""
    celery = server.services.celery
    result = celery.send_task("long_running_task", kwargs={"delay": 0.01}, queue=f"parked-{uuid.uuid4()}")
    async with httpx.AsyncClient(base_url=server.url) as http:
        status = (await http.get(f"/api/v1/jobs/{result.id}")).json()
    assert status["status"] == "PENDING" and status["task"] == "long_running_task"
    delayed = celery.tasks["long_running_task"].delay(delay=0.01)  # a consumed queue: it runs to the end
    events = await watch_ws(server.ws_url, delayed.id)
    assert [e["state"] for e in events][0] == "PENDING" and events[-1]["state"] == "SUCCESS"


async def test_ordinary_task_gets_lifecycle_events(server: RunningServer) -> None:
    """A plain @shared_task, sent with apply_async, reports PENDING → STARTED → SUCCESS unchanged."""
    plain_sum = server.services.celery.tasks["plain_sum"]
    result = plain_sum.apply_async(([1, 2, 3.5],), {"delay": 0.05})
    events = await watch_ws(server.ws_url, result.id)
    assert [e["state"] for e in events] == ["PENDING", "STARTED", "SUCCESS"]
    assert events[-1]["result"] == 6.5 and events[0]["task"] == "plain_sum"


async def test_plain_celery_revoke_is_recorded_by_the_worker(server: RunningServer) -> None:
    """Revoked with Celery's own API (no jobwire call): the worker's signal records REVOKED."""
    celery = server.services.celery
    result = celery.tasks["plain_sum"].apply_async(([1],), countdown=30)  # held by the worker until its eta
    await wait_until(lambda: _scheduled(celery, result.id), what="the worker holds the eta task")
    result.revoke()
    events = await watch_ws(server.ws_url, result.id)
    assert [e["state"] for e in events] == ["PENDING", "REVOKED"]
    assert events[-1]["error"] == {"type": "TaskRevokedError", "message": "revoked before it started"}


async def test_job_revoked_before_any_worker_knew_never_runs(server: RunningServer, worker) -> None:  # type: ignore[no-untyped-def]
    """REVOKED in jobwire but never broadcast to this worker: the ProgressTask body does not run."""

    celery = server.services.celery
    job_id = f"revoked-early-{uuid.uuid4()}"
    recorder = Recorder.for_app(celery)
    recorder.record(job_id, "PENDING", task="report_steps")
    recorder.record(job_id, "REVOKED", error={"type": "TaskRevokedError", "message": "no broadcast"})
    celery.send_task("report_steps", kwargs={"steps": 1, "delay": 0.01}, task_id=job_id)
    log = worker.log_path
    await wait_until(
        lambda: f"{job_id}] ignored" in log.read_text(), what="the worker logs it ignored the task"
    )
    assert AsyncResult(job_id, app=celery).state != "SUCCESS"  # the body never ran
    events = await watch_ws(server.ws_url, job_id)
    assert [e["state"] for e in events] == ["PENDING", "REVOKED"]
