"""A Celery app that never imported jobwire (tests/apps/foreign.py), followed through its
result backend's publishes, on every transport, by two server processes at once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from redis.asyncio import Redis

from jobwire.server.bridge import Bridge
from jobwire.settings import Settings
from tests.clients import assert_gap_free, transitions, ws_job_events
from tests.support import RedisServer, RunningServer, Worker, run_server, wait_until


@pytest.fixture
def foreign_worker(own_redis: RedisServer, tmp_path: Path) -> Iterator[Worker]:
    worker = Worker(
        own_redis.url,
        tmp_path / "foreign.log",
        app="tests.apps.foreign",
        queues="foreign",
        env={"FOREIGN_REDIS_URL": own_redis.url},
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
async def servers(settings: Settings, own_redis: RedisServer) -> AsyncIterator[list[RunningServer]]:
    followed = settings.model_copy(update={"celery_backends": (f"{own_redis.url}#prefix=shop:",)})
    async with run_server(followed) as one, run_server(followed) as two:
        yield [one, two]


def _send(url: str, task: str, **kwargs: Any) -> str:
    """Send as the foreign app's own code would: plain Celery, no jobwire."""
    job_id = str(uuid.uuid4())
    sender = Celery("sender", broker=url, set_as_current=False)
    sender.send_task(task, kwargs=kwargs, task_id=job_id, queue="foreign")
    sender.close()
    return job_id


async def _known(server: RunningServer, job_id: str) -> None:
    async def found() -> bool:
        async with httpx.AsyncClient(base_url=server.url) as http:
            return (await http.get(f"/api/v1/jobs/{job_id}")).status_code == 200

    await wait_until(found, what=f"jobwire hears of {job_id}")


async def _ws(server: RunningServer, job_id: str) -> list[dict[str, Any]]:
    return await ws_job_events(f"{server.ws_url}/ws/jobs/{job_id}")


async def _sse(server: RunningServer, job_id: str) -> list[dict[str, Any]]:
    events = []
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        http.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


async def _poll(server: RunningServer, job_id: str) -> list[dict[str, Any]]:
    """A polling client: batch status until final, then the history."""
    async with httpx.AsyncClient(base_url=server.url) as http:

        async def ready() -> bool:
            status = (await http.post("/api/v1/jobs/batch-status", json={"job_ids": [job_id]})).json()
            return bool(status["jobs"][job_id]["ready"])

        await wait_until(ready, what=f"{job_id} is final", timeout=30)
        return list((await http.get(f"/api/v1/jobs/{job_id}/history")).json()["events"])


async def test_foreign_jobs_stream_like_native_ones(
    servers: list[RunningServer], foreign_worker: Worker, own_redis: RedisServer
) -> None:
    one, two = servers
    job_id = await asyncio.to_thread(_send, own_redis.url, "shop.crunch", steps=3, gated=True)
    await _known(one, job_id)
    watching = asyncio.gather(_ws(one, job_id), _sse(two, job_id), _poll(two, job_id), _ws(two, job_id))
    channel = one.services.settings.keys.job_channel(job_id)
    await wait_until(
        lambda: one.services.hub.subscribers(channel) == 1 and two.services.hub.subscribers(channel) == 2,
        what="three streaming watchers attached",
    )
    own_redis.client().rpush(f"shop:gate:{job_id}", *["go"] * 4)  # the job runs while they watch
    streams = await asyncio.wait_for(watching, 30)
    for events in streams:
        assert_gap_free(events)
        assert transitions(events) == ["STARTED", "PROCESSING", "UPLOADING", "SUCCESS"]
        assert events[-1]["result"] == {"rows": 30} and events[-1]["task"] == "shop.crunch"
        processing = [e["progress"] for e in events if e["state"] == "PROCESSING"]
        assert processing[-1] == {"current": 3, "total": 3, "percent": 100.0}
    # Both processes heard every publish; each was recorded once, in order.
    assert [e["seq"] for e in streams[2]] == list(range(1, 7))
    # One subscription per backend per process, whatever the watchers.
    assert own_redis.client().execute_command("PUBSUB", "NUMPAT") == 2


async def test_foreign_failure_and_unknown_ids(
    servers: list[RunningServer], foreign_worker: Worker, own_redis: RedisServer
) -> None:
    one, _ = servers
    job_id = await asyncio.to_thread(_send, own_redis.url, "shop.broken")
    await _known(one, job_id)
    events = await asyncio.wait_for(_ws(one, job_id), 30)
    assert events[-1]["state"] == "FAILURE"
    assert events[-1]["error"] == {"type": "RuntimeError", "message": "the shop's disk is full"}
    async with httpx.AsyncClient(base_url=one.url) as http:
        unknown = await http.get(f"/api/v1/jobs/{uuid.uuid4()}")
    assert unknown.status_code == 404  # where AsyncResult would say PENDING forever


async def test_a_server_started_late_reads_the_current_state(
    settings: Settings, foreign_worker: Worker, own_redis: RedisServer
) -> None:
    """Publishes nobody heard: the job's state comes from Celery's result key on demand."""
    job_id = await asyncio.to_thread(_send, own_redis.url, "shop.crunch", steps=1)
    key = f"shop:celery-task-meta-{job_id}"
    await wait_until(
        lambda: b"SUCCESS" in (own_redis.client().get(key) or b""), what="the foreign job finishes"
    )
    followed = settings.model_copy(update={"celery_backends": (f"{own_redis.url}#prefix=shop:",)})
    async with run_server(followed) as late, httpx.AsyncClient(base_url=late.url) as http:
        snapshot = (await http.get(f"/api/v1/jobs/{job_id}")).json()
    assert snapshot["status"] == "SUCCESS" and snapshot["result"] == {"rows": 10}


async def test_a_lagging_process_cannot_repeat_or_reorder_what_another_recorded(
    settings: Settings, own_redis: RedisServer
) -> None:
    """Every process hears every publish, at its own pace: one records X then Y, the other
    offers X again after Y. The record script drops the repeat, so the stream stays X, Y."""
    followed = settings.model_copy(update={"celery_backends": (f"{own_redis.url}#prefix=shop:",)})
    redis = Redis.from_url(settings.redis_url)
    fast, slow = Bridge(redis, followed), Bridge(redis, followed)
    backend = fast.backends[0]
    job_id = str(uuid.uuid4())
    channel = backend.key(job_id).encode()
    x = json.dumps({"status": "PROCESSING", "result": {"current": 1}, "task_id": job_id}).encode()
    y = json.dumps({"status": "PROCESSING", "result": {"current": 2}, "task_id": job_id}).encode()
    for bridge, payload in ((fast, x), (fast, y), (slow, x), (slow, y)):
        await bridge._heard(backend, channel, payload)
    history = await redis.zrange(settings.keys.history(job_id), 0, -1)
    assert [json.loads(e)["progress"]["current"] for e in history] == [1, 2]
    await redis.aclose()
