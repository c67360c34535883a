"""jobwire on a real 3-node Redis Cluster: jobs on every node, sharded pub/sub with one
connection per shard, batch status in one call per node, Celery's results on a standalone
Redis beside it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import websockets
from celery.result import AsyncResult

from jobwire.settings import Settings
from jobwire.tasks.demo import create_demo_app
from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free, events_until_final, until_subscribed
from tests.support import RedisServer, Worker, redis_cluster, run_server, settings_for, wait_until

JOBS = [f"cluster-job-{i}" for i in range(30)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    with redis_cluster(3) as nodes:
        yield nodes


@pytest.fixture
def cluster_settings(cluster: list[RedisServer], own_redis: RedisServer) -> Settings:
    return settings_for(
        f"redis://127.0.0.1:{cluster[0].port}/0", redis_cluster=True, broker_url=own_redis.url
    )


def _commands(node: RedisServer, name: str) -> int:
    stats = node.client().info("commandstats").get(f"cmdstat_{name}")
    return int(stats["calls"]) if stats else 0


async def _watch_all(ws_url: str) -> list[list[dict[str, object]]]:
    """Every event of every job, per job, on one /ws socket subscribed to all of them."""
    async with websockets.connect(f"{ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": JOBS}))
        events: dict[str, list[dict[str, object]]] = {j: [] for j in JOBS}
        for job_id in JOBS:
            for event in await until_subscribed(ws, job_id):
                events[str(event["job_id"])].append(event)
        while not all(e and e[-1]["final"] for e in events.values()):
            msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if msg["type"] == "event":
                events[msg["job_id"]].append(msg)
        return [events[j] for j in JOBS]


async def test_jobs_on_every_node_reach_every_client(
    cluster: list[RedisServer], cluster_settings: Settings
) -> None:
    recorder = Recorder(redis.RedisCluster.from_url(cluster_settings.redis_url), cluster_settings)
    for job_id in JOBS:
        recorder.record(job_id, "PENDING", task="demo")
    assert all(node.client().dbsize() > 0 for node in cluster), "every node holds jobs"
    async with run_server(cluster_settings) as srv:
        hub = srv.services.hub
        watchers = [asyncio.create_task(_watch_all(srv.ws_url)) for _ in range(3)]
        channels = [cluster_settings.keys.job_channel(j) for j in JOBS]
        await wait_until(lambda: all(hub.subscribers(c) == 3 for c in channels), what="3 watchers per job")
        # One pub/sub connection per shard, whatever the number of watchers and jobs.
        assert hub.shards == 3
        for node in cluster:
            pubsub = [c for c in node.client().client_list(_type="pubsub")]
            assert 1 <= len(pubsub) <= 2, pubsub  # its shard's, and the plain hub's on one node
        for step in range(3):
            for job_id in JOBS:
                recorder.record(job_id, "WORKING", progress={"step": step})
        for job_id in JOBS:
            recorder.record(job_id, "SUCCESS", result=job_id)
        for per_job in await asyncio.wait_for(asyncio.gather(*watchers), 60):
            for job_id, events in zip(JOBS, per_job, strict=True):
                assert_gap_free(events)  # type: ignore[arg-type]
                assert events[0]["state"] == "PENDING" and events[-1]["result"] == job_id
                assert events[-2]["progress"] == {"step": 2}

        evals = [_commands(node, "eval") for node in cluster]
        async with httpx.AsyncClient(base_url=srv.url) as http:
            resp = await http.post("/api/v1/jobs/batch-status", json={"job_ids": [*JOBS, "nope"]})
        assert resp.status_code == 200, resp.text
        statuses = resp.json()["jobs"]
        assert {statuses[j]["status"] for j in JOBS} == {"SUCCESS"}
        assert statuses["nope"]["status"] == "UNKNOWN"
        # One call per node covered them all.
        calls = [_commands(node, "eval") - before for node, before in zip(cluster, evals, strict=True)]
        assert calls == [1, 1, 1]

        async with httpx.AsyncClient(base_url=srv.url) as http:
            listed = (await http.get("/api/v1/jobs", params={"limit": 100})).json()["jobs"]
        assert {j["job_id"] for j in listed} >= set(JOBS)


async def test_celery_results_stay_on_standalone_redis(
    cluster: list[RedisServer], cluster_settings: Settings, own_redis: RedisServer, tmp_path: Path
) -> None:
    """A real worker: jobwire's events on the cluster, Celery's results on its own Redis."""
    env = {"JOBWIRE_REDIS_CLUSTER": "1", "JOBWIRE_BROKER_URL": own_redis.url}
    worker = Worker(cluster_settings.redis_url, tmp_path / "worker.log", env=env)
    worker.start()
    try:
        async with run_server(cluster_settings) as srv:
            async with httpx.AsyncClient(base_url=srv.url) as http:
                resp = await http.post(
                    "/api/v1/jobs", json={"task": "long_running_task", "kwargs": {"delay": 0.05}}
                )
                assert resp.status_code == 202, resp.text
                job_id = resp.json()["job_id"]
            async with websockets.connect(f"{srv.ws_url}/ws") as ws:
                await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
                events = await events_until_final(ws, job_id, events=await until_subscribed(ws, job_id))
        assert_gap_free(events)
        assert [e["state"] for e in events][-1] == "SUCCESS"
        assert "VALIDATING" in {e["state"] for e in events}  # plain update_state, on the cluster
        app = create_demo_app(cluster_settings)
        result = AsyncResult(job_id, app=app)
        assert result.state == "SUCCESS"
        assert own_redis.client().exists(f"jobwire:celery-task-meta-{job_id}")
    finally:
        worker.stop()
