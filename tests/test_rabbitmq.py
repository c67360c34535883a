"""The most common production setup: a RabbitMQ broker with a Redis result backend.

Runs against the RabbitMQ on this machine (127.0.0.1:5672, guest/guest), on a queue of its
own. Skipped, loudly, only where no RabbitMQ answers; CI has one, and there it must run.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from celery.result import AsyncResult

from tests.clients import LIFECYCLE, assert_gap_free, submit, watch_ws
from tests.support import (
    RedisServer,
    RunningServer,
    Worker,
    redis_server,
    run_server,
    settings_for,
    wait_until,
)

BROKER = os.environ.get("JOBWIRE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbit_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


if not _rabbit_answers():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the RabbitMQ tests, but nothing answers on 127.0.0.1:5672")
    pytest.skip(
        "NO RABBITMQ on 127.0.0.1:5672: the RabbitMQ broker tests did not run (start rabbitmq-server)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def rabbit_env() -> Iterator[dict[str, str]]:
    # A queue of this run's own: nothing another run left behind reaches this worker.
    env = {"JOBWIRE_BROKER_URL": BROKER, "JOBWIRE_DEMO_QUEUE": f"jobwire-test-{uuid.uuid4().hex[:8]}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # the in-process server's demo app reads the queue here
        yield env


@pytest.fixture(scope="module")
def results_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def rabbit_worker(
    results_redis: RedisServer, rabbit_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """One process, so a second job waits queued behind the first."""
    w = Worker(
        results_redis.url,
        Path(tmp_path_factory.mktemp("rabbit")) / "worker.log",
        concurrency=1,
        env=rabbit_env,
    )
    w.start()
    yield w
    w.stop()


@pytest.fixture
async def rabbit_server(results_redis: RedisServer, rabbit_worker: Worker) -> AsyncIterator[RunningServer]:
    async with run_server(settings_for(results_redis.url, broker_url=BROKER, heartbeat_interval=2.0)) as srv:
        yield srv


async def test_lifecycle_and_retry_over_rabbitmq(rabbit_server: RunningServer) -> None:
    """PENDING at publish (RabbitMQ), update_state progress, RETRY, SUCCESS: gap-free."""
    job_id = await submit(rabbit_server.url, delay=0.05)
    events = await watch_ws(rabbit_server.ws_url, job_id)
    assert [e["state"] for e in events] == LIFECYCLE
    assert_gap_free(events)
    retry_id = await submit(rabbit_server.url, "retrying_task", delay=0.1, failures=1)
    states = [e["state"] for e in await watch_ws(rabbit_server.ws_url, retry_id)]
    assert states == ["PENDING", "STARTED", "PROCESSING", "RETRY", "STARTED", "PROCESSING", "SUCCESS"]


async def test_revoke_running_and_queued_over_rabbitmq(
    rabbit_server: RunningServer, rabbit_worker: Worker
) -> None:
    """The running job is terminated (REVOKED for jobwire and Celery); the one queued behind
    it goes PENDING → REVOKED and never starts."""
    celery = rabbit_server.services.celery
    running = await submit(rabbit_server.url, "report_steps", steps=100, delay=0.2)
    queued = await submit(rabbit_server.url, delay=0.05)

    async def state(job_id: str) -> str:
        async with httpx.AsyncClient(base_url=rabbit_server.url) as http:
            return str((await http.get(f"/api/v1/jobs/{job_id}")).json()["status"])

    async def first_runs() -> bool:
        return await state(running) == "WORKING"

    await wait_until(first_runs, what="the first job runs")
    assert await state(queued) == "PENDING"
    async with httpx.AsyncClient(base_url=rabbit_server.url) as http:
        assert (await http.delete(f"/api/v1/jobs/{queued}")).status_code == 202
        assert (await http.delete(f"/api/v1/jobs/{running}")).status_code == 202
    assert [e["state"] for e in await watch_ws(rabbit_server.ws_url, queued)] == ["PENDING", "REVOKED"]
    running_events = await watch_ws(rabbit_server.ws_url, running)
    assert running_events[-1]["state"] == "REVOKED" and "SUCCESS" not in [e["state"] for e in running_events]
    log = rabbit_worker.log_path
    await wait_until(
        lambda: f"Discarding revoked task: long_running_task[{queued}]" in log.read_text(),
        what="the worker discards the queued job",
    )
    await wait_until(
        lambda: f"Terminating {running}" in log.read_text(), what="the worker terminates the running job"
    )
    assert AsyncResult(running, app=celery).state == "REVOKED"
    assert "STARTED" not in [e["state"] for e in await watch_ws(rabbit_server.ws_url, queued)]
