"""The Python client and the `jobwire` CLI against a real server and worker."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import pytest
import redis

from jobwire.client import JobNotFound, Jobwire, watch
from jobwire.settings import Settings
from tests.clients import LIFECYCLE, assert_gap_free, submit
from tests.support import ROOT, RunningServer, free_port, run_server, wait_until


async def test_watch_yields_whole_lifecycle(server: RunningServer) -> None:
    """async for event in watch(id): every transition, in order, ending on the final one."""
    async with Jobwire(server.url) as api:
        job_id = await api.submit("long_running_task", delay=0.05)
    events = [e async for e in watch(job_id, server.url)]
    assert [e["state"] for e in events] == LIFECYCLE
    assert_gap_free(events)
    assert "type" not in events[0]


async def test_watch_resumes_across_server_restart(settings: Settings, worker: object) -> None:
    """The server goes away mid-job and comes back on the same port: watch() misses nothing."""
    port = free_port()
    events: list[dict] = []
    async with run_server(settings, port) as srv:
        job_id = await submit(srv.url, delay=0.6)

        async def consume() -> None:
            async for event in watch(job_id, srv.url, backoff_min=0.05, backoff_max=0.3):
                events.append(event)

        consumer = asyncio.create_task(consume())
        await wait_until(lambda: any(e["state"] == "VALIDATING" for e in events), what="VALIDATING arrives")
    store = redis.Redis.from_url(settings.redis_url)
    await wait_until(
        lambda: store.hget(settings.keys.job(job_id), "state") == b"UPLOADING",
        what="the job moves on while the server is down",
    )
    store.close()
    async with run_server(settings, port):
        await asyncio.wait_for(consumer, 20)
    assert [e["state"] for e in events] == LIFECYCLE
    assert_gap_free(events)


async def test_watch_unknown_job_raises(server: RunningServer) -> None:
    """watch() on an id never submitted raises JobNotFound instead of waiting forever."""
    with pytest.raises(JobNotFound):
        async for _ in watch(f"missing-{uuid.uuid4()}", server.url):
            pass


async def _cli(url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobwire.cli",
        "--url",
        url,
        *args,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "100"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_cli_watch_exit_codes(server: RunningServer) -> None:
    """`jobwire watch`: exit 0 on SUCCESS, 1 on FAILURE, 2 on REVOKED, 3 for an unknown job."""
    ok = await submit(server.url, delay=0.05)
    code, out = await _cli(server.url, "watch", ok)
    assert code == 0, out
    for state in LIFECYCLE:
        assert state in out
    assert '"status": "done"' in out

    failing = await submit(server.url, "failing_task", delay=0.05)
    code, out = await _cli(server.url, "watch", failing)
    assert code == 1 and "ValueError: Simulated failure" in out

    doomed = await submit(server.url, delay=2)
    async with Jobwire(server.url) as api:
        await api.revoke(doomed)
    code, out = await _cli(server.url, "watch", doomed)
    assert code == 2 and "REVOKED" in out

    code, out = await _cli(server.url, "watch", f"missing-{uuid.uuid4()}")
    assert code == 3 and "not found" in out


async def test_cli_submit_and_status(server: RunningServer) -> None:
    """`jobwire submit TASK k=v --watch` runs it to the end; `jobwire status` reports it."""
    code, out = await _cli(server.url, "submit", "long_running_task", "delay=0.02", "--watch")
    assert code == 0, out
    job_id = out.strip().splitlines()[0]
    code, out = await _cli(server.url, "status", job_id, "--json")
    assert code == 0 and '"SUCCESS"' in out
    code, out = await _cli(server.url, "status", job_id, "never-submitted")
    assert code == 3 and "UNKNOWN" in out
    code, out = await _cli("http://127.0.0.1:9", "status", job_id)
    assert code == 4 and "unreachable" in out
