"""Lost history is never silent: Redis, keeping nothing on disk, is killed mid-job and
restarted empty. The job's record comes back with a new epoch and seqs from 1, and every
client (websocket, SSE, polling, the Python client) is told and reaches the final state,
where it once waited forever.

With authentication on, the record must come back with its owner too: the worker's next
event carries it (from the task's message headers), so the owning tenant's clients follow
the job through the reset, and another tenant still cannot tell it from an unknown id."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import websockets

from jobwire.client import JobNotFound, watch
from tests.clients import assert_gap_free, next_of, sse_blocks
from tests.support import RedisServer, RunningServer, Worker, run_server, settings_for, wait_until
from tests.test_auth import AUDIENCE, SECRET, bearer, same_answer, token

pytestmark = pytest.mark.timeout(150)

#: Answers "not found" a client takes, once the job's record is back, before it concludes
#: the job stays out of its reach (its owner was lost with the record).
NOT_FOUND_AFTER_RETURN = 20


class Lost:
    """Tells a client whether a "not found" can be waited out: the job's record was lost
    and comes back with the worker's next event. Once it is back, a client still refused
    a few times over has lost the job for good, and the test fails saying so."""

    def __init__(self, store: redis.Redis, job_key: str, what: str) -> None:
        self.store, self.job_key, self.what = store, job_key, what
        self.refusals = 0

    async def wait_for_record(self) -> None:
        await wait_until(lambda: self.store.exists(self.job_key), what="the record is back", timeout=60)
        self.refusals += 1
        assert self.refusals <= NOT_FOUND_AFTER_RETURN, f"{self.what}: still not found with the record back"


async def ws_client(
    srv: RunningServer, job_id: str, headers: dict[str, str], lost: Lost
) -> list[dict[str, Any]]:
    """/ws as a reconnecting client uses it: resume with since and epochs."""
    seen: list[dict[str, Any]] = []
    last, epoch = 0, None
    while True:
        try:
            async with websockets.connect(f"{srv.ws_url}/ws", additional_headers=headers) as ws:
                sub: dict[str, Any] = {"op": "subscribe", "job_ids": [job_id], "since": {job_id: last}}
                if epoch:
                    sub["epochs"] = {job_id: epoch}
                await ws.send(json.dumps(sub))
                async for frame in ws:
                    msg = json.loads(frame)
                    if msg["type"] == "error" and msg.get("code") == "job_not_found" and epoch:
                        # Seen before, gone now: its record was lost and comes back with the
                        # worker's next event. Ask again once it has.
                        await lost.wait_for_record()
                        await ws.send(json.dumps(sub))
                    elif msg["type"] == "error" and msg.get("code") == "unavailable":
                        # Redis went away under the subscribe: "retry", once it is back.
                        await wait_until(
                            lambda: srv.services.hub.connected, what="the server has Redis again"
                        )
                        await ws.send(json.dumps(sub))
                    elif msg["type"] == "error":
                        raise AssertionError(msg)
                    elif msg["type"] == "reset":
                        seen.append(msg)
                        last, epoch = 0, msg["epoch"]
                    elif msg["type"] == "event" and msg["seq"] > last:
                        seen.append(msg)
                        last, epoch = msg["seq"], msg["epoch"]
                        if msg["final"]:
                            return seen
        except (OSError, websockets.ConnectionClosed):
            await wait_until(lambda: srv.services.hub.connected, what="the server has Redis again")


async def sse_client(
    srv: RunningServer, job_id: str, headers: dict[str, str], lost: Lost
) -> list[dict[str, Any]]:
    """`/api/v1/jobs/{id}/events` as EventSource uses it: reconnect with Last-Event-ID."""
    seen: list[dict[str, Any]] = []
    last_id: str | None = None
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        while True:
            resume = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with http.stream(
                    "GET", f"/api/v1/jobs/{job_id}/events", headers=headers | resume
                ) as resp:
                    if resp.status_code == 404 and last_id:
                        await lost.wait_for_record()
                        continue
                    if resp.status_code == 503:
                        await wait_until(
                            lambda: srv.services.hub.connected, what="the server has Redis again"
                        )
                        continue
                    assert resp.status_code == 200, (resp.status_code, await resp.aread())
                    async for block in sse_blocks(resp):
                        data = json.loads(block["data"])
                        if block.get("event") == "control" and data["type"] == "reset":
                            seen.append(data)
                        elif "id" in block:
                            seen.append(data)
                            last_id = block["id"]
                            if data["final"]:
                                return seen
            except httpx.TransportError:
                await wait_until(lambda: srv.services.hub.connected, what="the server has Redis again")


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "jwt"])
async def test_redis_restart_without_persistence_resets_every_client(
    own_redis: RedisServer, tmp_path: Path, auth: bool
) -> None:
    worker = Worker(own_redis.url, tmp_path / "w.log", concurrency=1, hostname="epochs@%h")
    worker.start()
    owner, other = token("acme"), token("globex", "bob")
    headers = bearer(owner) if auth else {}
    jwt = dict(auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE) if auth else {}
    try:
        settings = settings_for(own_redis.url, heartbeat_interval=1.0, subscribe_timeout=2.0, **jwt)
        async with run_server(settings) as srv:
            async with httpx.AsyncClient(base_url=srv.url, headers=headers) as http:
                resp = await http.post(
                    "/api/v1/jobs", json={"task": "report_steps", "kwargs": {"steps": 12, "delay": 0.4}}
                )
                assert resp.status_code == 202, resp.text
                job_id = resp.json()["job_id"]
            py_events: list[dict[str, Any]] = []

            async def python_client() -> None:
                # lost_grace: how long watch() takes "not found" for a job it has seen
                tok = owner if auth else None
                async for event in watch(
                    job_id, srv.url, token=tok, backoff_min=0.05, backoff_max=0.5, lost_grace=20
                ):
                    py_events.append(event)

            store, job_key = own_redis.client(), settings.keys.job(job_id)
            consumer = asyncio.create_task(python_client())
            ws_task = asyncio.create_task(ws_client(srv, job_id, headers, Lost(store, job_key, "/ws")))
            sse_task = asyncio.create_task(sse_client(srv, job_id, headers, Lost(store, job_key, "SSE")))
            await wait_until(
                lambda: sum(e["state"] == "WORKING" for e in py_events) >= 3, what="the job is under way"
            )
            old_epoch, old_seq = py_events[-1]["epoch"], py_events[-1]["seq"]

            own_redis.stop()  # SIGKILL: no persistence, everything is gone
            own_redis.start()

            await asyncio.wait_for(consumer, 60)
            assert py_events[-1]["state"] == "SUCCESS" and py_events[-1]["epoch"] != old_epoch
            new_epoch = py_events[-1]["epoch"]
            new = [e for e in py_events if e["epoch"] != old_epoch]
            # The new history, whole: every seq delivered or counted in a `coalesced`, and
            # its first event (a transition) in its own place, never coalesced away.
            assert_gap_free(new)
            assert new[0]["seq"] == 1 and "coalesced" not in new[0], new[:2]

            # /ws and SSE: told of the reset, then the new history to the end.
            for name, task in (("/ws", ws_task), ("SSE", sse_task)):
                seen = await asyncio.wait_for(task, 30)
                resets = [m for m in seen if m.get("type") == "reset"]
                assert resets and resets[-1]["epoch"] == new_epoch, name
                assert seen[-1]["state"] == "SUCCESS" and seen[-1]["epoch"] == new_epoch, name

            async with httpx.AsyncClient(base_url=srv.url, headers=headers) as http:
                # Polling from the old epoch: told, and given the whole new history.
                params = {"since": old_seq, "epoch": old_epoch}
                polled = (await http.get(f"/api/v1/jobs/{job_id}/history", params=params)).json()
                assert polled["reset"] is True and polled["epoch"] == new_epoch
                assert polled["events"][-1]["state"] == "SUCCESS" and polled["events"][0]["seq"] == 1
                status = await http.get(f"/api/v1/jobs/{job_id}")
                assert status.status_code == 200 and status.json()["status"] == "SUCCESS"
                if auth:  # the tenant's listing has it again, indexed when it was recreated
                    listed = (await http.get("/api/v1/jobs")).json()["jobs"]
                    assert job_id in [j["job_id"] for j in listed]
            if auth:
                assert store.hmget(job_key, "tenant", "sub") == [b"acme", b"alice"]
                await _another_tenant_learns_nothing(srv, job_id, bearer(other))
    finally:
        worker.stop()


async def _another_tenant_learns_nothing(srv: RunningServer, job_id: str, headers: dict[str, str]) -> None:
    """The recreated job answers another tenant exactly as an id that never existed."""
    ghost = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=srv.url, headers=headers) as http:
        for path in ("", "/history", "/events"):
            foreign = await http.get(f"/api/v1/jobs/{job_id}{path}")
            unknown = await http.get(f"/api/v1/jobs/{ghost}{path}")
            assert foreign.status_code == unknown.status_code == 404, path
            assert same_answer(foreign.json(), unknown.json(), job_id, ghost), path
        foreign_sse = (await http.get("/api/v1/events", params={"job": job_id})).text
        unknown_sse = (await http.get("/api/v1/events", params={"job": ghost})).text
        assert foreign_sse.replace(job_id, "<id>") == unknown_sse.replace(ghost, "<id>")
    async with websockets.connect(f"{srv.ws_url}/ws", additional_headers=headers) as ws:
        answers = []
        for job in (job_id, ghost):
            await ws.send(json.dumps({"op": "subscribe", "job_ids": [job], "since": {job: 3}}))
            answers.append(await next_of(ws, "error", "event", "subscribed"))
        assert answers[0]["code"] == "job_not_found"
        assert same_answer(answers[0], answers[1], job_id, ghost)
    for job in (job_id, ghost):
        async with websockets.connect(f"{srv.ws_url}/ws/jobs/{job}", additional_headers=headers) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4404, "job not found")
    with pytest.raises(JobNotFound):
        async for _ in watch(job_id, srv.url, token=headers["Authorization"][7:]):
            pass
