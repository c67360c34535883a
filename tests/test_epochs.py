"""Lost history is never silent: Redis, keeping nothing on disk, is killed mid-job and
restarted empty. The job's record comes back with a new epoch and seqs from 1, and every
client (websocket, SSE, polling, the Python client) is told and reaches the final state,
where it once waited forever."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from jobwire.client import watch
from tests.clients import submit
from tests.support import RedisServer, Worker, run_server, settings_for, wait_until

pytestmark = pytest.mark.timeout(120)


async def test_redis_restart_without_persistence_resets_every_client(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    worker = Worker(own_redis.url, tmp_path / "w.log", concurrency=1, hostname="epochs@%h")
    worker.start()
    try:
        settings = settings_for(own_redis.url, heartbeat_interval=1.0, subscribe_timeout=2.0)
        async with run_server(settings) as srv:
            job_id = await submit(srv.url, "report_steps", steps=12, delay=0.4)
            py_events: list[dict[str, Any]] = []

            async def python_client() -> None:
                async for event in watch(job_id, srv.url, backoff_min=0.05, backoff_max=0.5):
                    py_events.append(event)

            consumer = asyncio.create_task(python_client())
            store, job_key = own_redis.client(), settings.keys.job(job_id)
            ws_seen: list[dict[str, Any]] = []

            async def ws_client() -> None:
                """/ws as a reconnecting client uses it: resume with since and epochs."""
                last, epoch = 0, None
                while True:
                    try:
                        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
                            sub = {"op": "subscribe", "job_ids": [job_id], "since": {job_id: last}}
                            if epoch:
                                sub["epochs"] = {job_id: epoch}
                            await ws.send(json.dumps(sub))
                            async for frame in ws:
                                msg = json.loads(frame)
                                if msg["type"] == "error" and msg.get("code") == "job_not_found" and epoch:
                                    # Seen before, gone now: its record was lost and comes back
                                    # with the worker's next event. Ask again once it has.
                                    await wait_until(lambda: store.exists(job_key), what="the record is back")
                                    await ws.send(json.dumps(sub))
                                elif msg["type"] == "reset":
                                    ws_seen.append(msg)
                                    last, epoch = 0, msg["epoch"]
                                elif msg["type"] == "event" and msg["seq"] > last:
                                    ws_seen.append(msg)
                                    last, epoch = msg["seq"], msg["epoch"]
                                    if msg["final"]:
                                        return
                    except (OSError, websockets.ConnectionClosed):
                        await wait_until(
                            lambda: srv.services.hub.connected, what="the server has Redis again"
                        )

            ws_task = asyncio.create_task(ws_client())
            await wait_until(
                lambda: sum(e["state"] == "WORKING" for e in py_events) >= 3, what="the job is under way"
            )
            old_epoch, old_seq = py_events[-1]["epoch"], py_events[-1]["seq"]

            own_redis.stop()  # SIGKILL: no persistence, everything is gone
            own_redis.start()

            await asyncio.wait_for(consumer, 60)
            assert py_events[-1]["state"] == "SUCCESS" and py_events[-1]["epoch"] != old_epoch
            new = [e for e in py_events if e["epoch"] != old_epoch]
            assert [e["seq"] for e in new] == list(range(1, len(new) + 1))  # the new history, whole

            # /ws: told of the reset, then the new history to the end.
            await asyncio.wait_for(ws_task, 30)
            resets = [m for m in ws_seen if m["type"] == "reset"]
            assert resets and resets[-1]["epoch"] == py_events[-1]["epoch"]
            assert ws_seen[-1]["state"] == "SUCCESS" and ws_seen[-1]["epoch"] == py_events[-1]["epoch"]

            # Polling from the old epoch: told, and given the whole new history.
            async with httpx.AsyncClient(base_url=srv.url) as http:
                params = {"since": old_seq, "epoch": old_epoch}
                polled = (await http.get(f"/api/v1/jobs/{job_id}/history", params=params)).json()
            assert polled["reset"] is True and polled["epoch"] == py_events[-1]["epoch"]
            assert polled["events"][-1]["state"] == "SUCCESS" and polled["events"][0]["seq"] == 1
    finally:
        worker.stop()
