"""High availability, for real: a Redis Cluster primary, or Sentinel's primary, is killed
(SIGKILL) while jobs run and clients watch on every transport. The server follows the new
primary with no restart, tells clients while their jobs' Redis is out of reach, answers no
5xx but a 503 that says when to retry, and every client reaches the final state.

The times printed (`pytest -s`) are what the README's "Deployment and scale" reports."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.crc import key_slot

from jobwire.redis_clients import sync_client
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free, submit
from tests.followers import Log, poll_follow, probe, server_faults, sse_follow, watch_follow, ws_follow
from tests.support import (
    RedisServer,
    SentinelSetup,
    Worker,
    primaries,
    redis_cluster,
    redis_sentinel,
    run_server,
    settings_for,
    wait_cluster_ok,
    wait_sentinel_failover,
    wait_until,
)


class Writers:
    """One thread per job, recording progress every `every` seconds until stopped, then
    SUCCESS: a worker's recorder, retrying through the failover as it does in a task."""

    def __init__(self, settings: Settings, jobs: list[str], every: float = 0.1) -> None:
        self.settings, self.jobs, self.every = settings, jobs, every
        self._stop = threading.Event()
        self.failures: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(j,), daemon=True) for j in jobs]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self, job: str) -> None:
        try:
            recorder = Recorder(sync_client(self.settings.redis_target), self.settings)
            step = 0
            while not self._stop.wait(self.every):
                step += 1
                recorder.record(job, "WORKING", progress={"step": step})
            recorder.record(job, "SUCCESS", result={"steps": step})
        except BaseException as exc:  # the test fails on it, below
            self.failures.append(exc)

    def finish(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not self.failures, self.failures


async def _readiness(url: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.get(f"{url}/readyz")
    return {"code": resp.status_code, **resp.json()}


async def _says(url: str, **expected: object) -> bool:
    got = await _readiness(url)
    return all(got[k] == v for k, v in expected.items())


async def _follow_everywhere(
    url: str, ws_url: str, jobs: list[str]
) -> tuple[list[Log], list[asyncio.Task[None]]]:
    logs = [Log("ws"), Log("watch"), Log("sse"), Log("poll")]
    ws, watched, sse, poll = logs
    tasks = [asyncio.create_task(ws_follow(ws_url, jobs, ws))]
    for job in jobs:
        tasks += [
            asyncio.create_task(watch_follow(url, job, watched)),
            asyncio.create_task(sse_follow(url, job, sse)),
            asyncio.create_task(poll_follow(url, job, poll)),
        ]
    return logs, tasks


def _check_streams(logs: list[Log], jobs: list[str]) -> None:
    """Every push client has every job's events in order, gap-free, to SUCCESS."""
    for log in logs:
        for job in jobs:
            events = log.events[job]
            assert events[-1]["state"] == "SUCCESS", (log.name, job, events[-3:])
            if log.name != "poll":
                assert_gap_free(events, first=events[0]["seq"] - events[0].get("coalesced", 0))


def _recovery(logs: list[Log], jobs: list[str], moment: float) -> dict[str, float]:
    """Per client kind: the longest wait, over `jobs`, from `moment` to an event."""
    out = {}
    for log in logs:
        waits = [log.first_after(job, moment) for job in jobs]
        out[log.name] = max(w for w in waits if w is not None) if all(w is not None for w in waits) else -1.0
    return out


# -- Redis Cluster ---------------------------------------------------------------------


@pytest.fixture
def ha_cluster() -> Iterator[list[RedisServer]]:
    with redis_cluster(3, replicas=1, node_timeout_ms=1000) as nodes:
        yield nodes


def _jobs_by_primary(nodes: list[RedisServer], settings: Settings, per_primary: int) -> dict[int, list[str]]:
    client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
    try:
        placed: dict[int, list[str]] = {n.port: [] for n in primaries(nodes)}
        i = 0
        while any(len(jobs) < per_primary for jobs in placed.values()):
            job = f"ha-job-{i}"
            port = client.get_node_from_key(settings.keys.job(job)).port
            if len(placed[port]) < per_primary:
                placed[port].append(job)
            i += 1
        return placed
    finally:
        client.close()


async def test_cluster_primary_killed_mid_job_every_client_follows(ha_cluster: list[RedisServer]) -> None:
    """SIGKILL the primary that JOBWIRE_REDIS_URL names first: its replica is promoted, the
    running server follows it (no restart), every transport's clients reach SUCCESS, and a
    server started afterwards with the same URL starts from the other seeds."""
    first, *others = primaries(ha_cluster)
    seeds = ",".join(f"127.0.0.1:{n.port}" for n in [first, *others])
    settings = settings_for(f"redis://{seeds}", redis_cluster=True, record_retry_seconds=30.0)
    by_primary = _jobs_by_primary(ha_cluster, settings, per_primary=2)
    hit, jobs = by_primary[first.port], [j for js in by_primary.values() for j in js]
    writers = Writers(settings, jobs)
    recorder = Recorder(sync_client(settings.redis_target), settings)
    for job in jobs:
        recorder.record(job, "PENDING", task="demo")

    async with run_server(settings) as srv:
        stop_probe = asyncio.Event()
        prober = Log("probe")
        probing = asyncio.create_task(probe(srv.url, jobs, prober, stop_probe))
        logs, followers = await _follow_everywhere(srv.url, srv.ws_url, jobs)
        writers.start()
        await wait_until(
            lambda: all(len(log.events.get(j, [])) >= 3 for log in logs[:3] for j in jobs),
            what="events flow to every push client",
            timeout=30,
        )
        killed_at = time.monotonic()
        first.stop()  # SIGKILL
        await wait_until(
            lambda: _says(srv.url, code=200, status="degraded", redis=True, hub="degraded"),
            what="/readyz says degraded, not down, while one shard is out",
        )
        async with httpx.AsyncClient() as http:
            scraped = (await http.get(f"{srv.url}/metrics")).text
        assert 'jobwire_hub_health{state="degraded"} 1.0' in scraped
        survivors = [n for n in ha_cluster if n is not first]
        await asyncio.to_thread(wait_cluster_ok, survivors)
        ok_at = time.monotonic()
        await wait_until(
            lambda: all(log.first_after(j, ok_at) is not None for log in logs for j in hit),
            what="events of the killed shard's jobs flow again to every client",
            timeout=30,
        )
        flowing = _recovery(logs, hit, ok_at)
        writers.finish()
        await asyncio.wait_for(asyncio.gather(*followers), 60)
        stop_probe.set()
        await probing
        assert await _readiness(srv.url) == {"code": 200, "status": "ready", "redis": True, "hub": "ok"}
        assert srv.services.hub.remaps >= 1

    _check_streams(logs, jobs)
    ws = logs[0]
    assert set(hit) <= ws.unavailable, "the killed shard's watchers were told"
    assert not (set(jobs) - set(hit)) & ws.unavailable, "the other shards' watchers were not"
    assert not server_faults([*logs, prober]), server_faults([*logs, prober])

    # The URL still names the dead node first: a new server starts from the others.
    async with run_server(settings) as again:
        await wait_until(lambda: _says(again.url, status="ready"), what="the new server is ready")
        log = Log("after")
        await asyncio.wait_for(ws_follow(again.ws_url, hit, log), 30)
        for job in hit:
            assert_gap_free(log.events[job])
    print(
        f"\ncluster failover: cluster_state:ok {ok_at - killed_at:.2f}s after the kill; "
        f"events flowing again (s after ok): {flowing}"
    )


async def test_resharding_is_followed(tmp_path: Path) -> None:
    """Slots moved with `redis-cli --cluster reshard` while a client watches a job in them:
    the node drops the subscription, the server follows the slot to its new owner."""
    with redis_cluster(3) as nodes:
        settings = settings_for(f"redis://127.0.0.1:{nodes[0].port}", redis_cluster=True)
        source, target = nodes[0], nodes[1]
        owned = [s for s in source.client().execute_command("CLUSTER SLOTS") if int(s[2][1]) == source.port]
        first_slot = min(int(s[0]) for s in owned)  # what `reshard` moves first
        job = next(
            f"re-{i}"
            for i in range(1_000_000)
            if key_slot(settings.keys.job(f"re-{i}").encode()) == first_slot
        )
        recorder = Recorder(sync_client(settings.redis_target), settings)
        recorder.record(job, "PENDING", task="demo")
        async with run_server(settings) as srv:
            log = Log("ws")
            following = asyncio.create_task(ws_follow(srv.ws_url, [job], log))
            await wait_until(lambda: bool(log.events.get(job)), what="the client has the job")
            ids = {n.port: n.client().execute_command("CLUSTER MYID").decode() for n in (source, target)}
            subprocess.run(
                ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}"]
                + ["--cluster-from", ids[source.port], "--cluster-to", ids[target.port]]
                + ["--cluster-slots", "10", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            await asyncio.to_thread(wait_cluster_ok, nodes)
            await asyncio.to_thread(recorder.record, job, "WORKING", progress={"step": 1})
            await asyncio.to_thread(recorder.record, job, "SUCCESS", result=1)
            await asyncio.wait_for(following, 30)
            assert srv.services.hub.remaps >= 1
    assert [e["state"] for e in log.events[job]] == ["PENDING", "WORKING", "SUCCESS"]
    assert_gap_free(log.events[job])


# -- Sentinel --------------------------------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[SentinelSetup]:
    with redis_sentinel() as setup:
        yield setup


async def test_sentinel_primary_killed_mid_job_every_client_follows(
    sentinel: SentinelSetup, own_redis: RedisServer, tmp_path: Path
) -> None:
    """A real worker whose result backend is Sentinel's primary; jobwire's server given the
    sentinels. SIGKILL the primary mid-job: workers and server follow the promoted replica,
    every transport's clients reach SUCCESS, with no restart."""
    env = {
        "JOBWIRE_REDIS_SENTINEL_MASTER": sentinel.master_name,
        "JOBWIRE_BROKER_URL": own_redis.url,
        "JOBWIRE_RECORD_RETRY_SECONDS": "30",
    }
    settings = settings_for(
        sentinel.url, redis_sentinel_master=sentinel.master_name, broker_url=own_redis.url
    )
    worker = Worker(sentinel.url, tmp_path / "worker.log", concurrency=2, env=env)
    worker.start()
    try:
        async with run_server(settings) as srv:
            jobs = [await submit(srv.url, delay=2.0) for _ in range(2)]
            stop_probe = asyncio.Event()
            prober = Log("probe")
            probing = asyncio.create_task(probe(srv.url, jobs, prober, stop_probe))
            logs, followers = await _follow_everywhere(srv.url, srv.ws_url, jobs)
            await wait_until(
                lambda: all(log.events.get(j) for log in logs for j in jobs),
                what="every client follows the jobs",
                timeout=30,
            )
            old = sentinel.current_primary_port()
            killed_at = time.monotonic()
            sentinel.kill_primary()
            await asyncio.to_thread(wait_sentinel_failover, sentinel, old)
            promoted_at = time.monotonic()
            await wait_until(lambda: srv.services.hub.connected, what="the hub is on the new primary")
            hub_back = time.monotonic() - promoted_at
            await asyncio.wait_for(asyncio.gather(*followers), 60)
            flowing = _recovery(logs, jobs, promoted_at)
            stop_probe.set()
            await probing
            await wait_until(lambda: _says(srv.url, status="ready"), what="/readyz ready again")
    finally:
        worker.stop()
    _check_streams(logs, jobs)
    for log in logs[:3]:
        for job in jobs:
            states = [e["state"] for e in log.events[job]]
            assert {"PROCESSING", "UPLOADING"} <= set(states) or log.name == "poll", (log.name, states)
    assert set(jobs) <= logs[0].unavailable, "the watchers were told"
    assert not server_faults([*logs, prober]), server_faults([*logs, prober])
    print(
        f"\nsentinel failover: promoted {promoted_at - killed_at:.2f}s after the kill; the hub on the "
        f"new primary {hub_back:.2f}s after; the next events (the task's own pace) after: {flowing}"
    )
