"""The worker-side write path: one round trip per report, Celery kept in step, final is final."""

from __future__ import annotations

import threading
import time

import orjson
import pytest
import redis
from celery import shared_task
from celery.result import AsyncResult
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobwire.settings import Settings
from jobwire.tasks.control import revoke_job
from jobwire.tasks.demo import create_demo_app
from jobwire.tasks.progress import ProgressTask
from jobwire.tasks.recorder import Owner, Recorder
from tests.support import RedisServer, redis_server, wait_until_sync


class Monitor:
    """Commands clients send to a Redis, from MONITOR (script-internal ones excluded)."""

    def __init__(self, server: RedisServer) -> None:
        self.commands: list[str] = []
        self._client = server.client()
        self._ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)
        # Open the marker's connection now, so its handshake is not counted (see stop()).
        self._marker = server.client()
        self._marker.echo("jobwire-monitor-start")
        self._seen("jobwire-monitor-start")
        self._start = len(self.commands)

    def _seen(self, marker: str) -> int:
        wait_until_sync(lambda: f"ECHO {marker}" in self.commands, what=f"MONITOR shows {marker}", timeout=5)
        return self.commands.index(f"ECHO {marker}")

    def _run(self) -> None:
        with self._client.monitor() as m:
            self._ready.set()
            for cmd in m.listen():
                if self._stop:
                    return
                if cmd.get("client_type") != "lua":
                    name, _, rest = cmd["command"].partition(" ")
                    self.commands.append(f"ECHO {rest}" if name.upper() == "ECHO" else name.upper())

    def stop(self) -> list[str]:
        """The commands seen since start, up to a marker sent now (MONITOR keeps order)."""
        self._marker.echo("jobwire-monitor-end")
        end = self._seen("jobwire-monitor-end")
        self._stop = True
        self._marker.ping()  # wakes listen() so the thread sees _stop
        self._marker.close()
        return self.commands[self._start : end]


@shared_task(bind=True, base=ProgressTask, name="probe")
def probe(self: ProgressTask) -> None:
    """A task whose report() the tests call directly, under a pushed request."""


@pytest.fixture
def app(own_redis: RedisServer):  # type: ignore[no-untyped-def]
    app = create_demo_app(Settings(redis_url=own_redis.url))
    yield app
    app.close()


def test_report_is_one_round_trip(app, own_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """report() sends exactly one command (EVALSHA): Celery's key, history, hash and publishes inside it."""
    task = app.tasks["probe"]
    task.push_request(id="rt-1")
    try:
        task.report("WARMING", step=0, total=2)  # loads the script once
        monitor = Monitor(own_redis)
        seq = task.report("PROBING", step=1, total=2, description="probing")
        sent = monitor.stop()
    finally:
        task.pop_request()
    assert seq == 2
    assert sent == ["EVALSHA"]
    result = AsyncResult("rt-1", app=app)
    assert result.state == "PROBING"
    assert result.info == {"step": 1, "total": 2, "percent": 50.0, "description": "probing"}


def test_report_refused_after_revoke(app) -> None:  # type: ignore[no-untyped-def]
    """After REVOKED, report() returns None and neither jobwire nor Celery shows a later state."""
    task = app.tasks["probe"]
    task.push_request(id="rt-2")
    try:
        assert task.report("PROBING", step=1, total=2) == 1
        assert revoke_job(app, "rt-2") == 2
        assert task.report("PROBING", step=2, total=2) is None
    finally:
        task.pop_request()
    assert AsyncResult("rt-2", app=app).state == "REVOKED"
    assert revoke_job(app, "rt-2") is None  # already final: nothing recorded, nothing sent


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"state": "SUCCESS"}, "custom state"),
        ({"state": ""}, "custom state"),
        ({"state": "X", "step": 3, "total": 2}, "past total"),
        ({"state": "X", "total": 0}, "positive"),
        ({"state": "X", "step": -1}, "non-negative"),
        ({"state": "X", "percent": 101}, "0 to 100"),
    ],
)
def test_report_rejects_bad_input(app, kwargs: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    """Lifecycle states and impossible progress are refused with a clear message."""
    task = app.tasks["probe"]
    task.push_request(id="rt-3")
    try:
        state = kwargs.pop("state")
        with pytest.raises(ValueError, match=message):
            task.report(state, **kwargs)
    finally:
        task.pop_request()


def test_every_event_names_the_owner_and_only_creation_sets_it(app, own_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """report() names the owner its message carries: when the job's record was lost, the
    event that recreates it restores the owner (and the tenant's listing); on a job that
    exists no event changes the owner. Still one round trip per event."""
    task, client = app.tasks["probe"], own_redis.client()
    keys = Settings(redis_url=own_redis.url).keys
    job = keys.job("owned")
    task.push_request(id="owned", jobwire_tenant="acme", jobwire_sub="alice")
    try:
        task.report("PROBING", step=0, total=3)
        client.delete(job, keys.history("owned"), keys.progress("owned"), keys.tenant_recent("acme"))
        assert task.report("PROBING", step=1, total=3) == 1  # recreated, under a new epoch
        assert client.hmget(job, "tenant", "sub") == [b"acme", b"alice"]
        assert client.zscore(keys.tenant_recent("acme"), "owned") is not None
        monitor = Monitor(own_redis)
        assert task.report("PROBING", step=2, total=3) == 2
        assert monitor.stop() == ["EVALSHA"]
    finally:
        task.pop_request()
    # Another owner named later (a forged header, a publisher of its own) takes nothing over.
    task.push_request(id="owned", jobwire_tenant="globex", jobwire_sub="mallory")
    try:
        assert task.report("PROBING", step=3, total=3) == 3
    finally:
        task.pop_request()
    assert Recorder.for_app(app).record("owned", "SUCCESS", result=1, owner=Owner("globex", "bob")) == 4
    assert client.hmget(job, "tenant", "sub") == [b"acme", b"alice"]
    assert client.zscore(keys.tenant_recent("globex"), "owned") is None


def test_retried_event_is_recorded_once(own_redis: RedisServer) -> None:
    """The same event id twice (a retry after a lost reply) returns the same seq, one event."""
    settings = Settings(redis_url=own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    first = recorder.record("idem", "WORKING", progress={"step": 1}, event_id="e-1")
    again = recorder.record("idem", "WORKING", progress={"step": 1}, event_id="e-1")
    later = recorder.record("idem", "WORKING", progress={"step": 2})
    assert (first, again, later) == (1, 1, 2)
    assert own_redis.client().zcard(settings.keys.history("idem")) == 2


def test_report_rides_out_a_redis_restart() -> None:
    """Redis restarts while a worker reports: the call waits, then lands, with no gap or duplicate."""
    with redis_server(persist=True) as server:
        settings = Settings(redis_url=server.url, record_retry_seconds=10)
        # No retries inside redis-py (its default rides out ~3 s by itself): this tests
        # the recorder's own window, which is what covers longer restarts.
        client = redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))
        recorder = Recorder(client, settings)
        assert recorder.record("blip", "WORKING", progress={"step": 1}) == 1
        server.stop()
        restart = threading.Timer(1.0, server.start)
        restart.start()
        started = time.monotonic()
        try:
            seq = recorder.record("blip", "WORKING", progress={"step": 2})  # Redis is down now
        finally:
            restart.join()
        assert seq == 2 and time.monotonic() - started >= 0.9
        history = server.client().zrange(settings.keys.history("blip"), 0, -1)
        assert [orjson.loads(e)["seq"] for e in history] == [1, 2]


def test_report_gives_up_after_the_retry_window(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis gone for longer than record_retry_seconds: the write retries (with backoff) for
    that window, then raises instead of hanging."""
    settings = Settings(redis_url=own_redis.url, record_retry_seconds=1.0)
    client = redis.Redis(port=own_redis.port, retry=Retry(NoBackoff(), 0))  # only the recorder retries
    recorder = Recorder(client, settings)
    own_redis.stop()
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="jobwire.tasks.recorder"), pytest.raises(redis.ConnectionError):
        recorder.record("gone", "WORKING")
    elapsed = time.monotonic() - started
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 3, "the recorder must retry before giving up"
    assert 1.0 <= elapsed <= 1.0 + 1.5  # it used the whole window, and stopped at its end (+ one last try)


def test_task_called_as_a_plain_function_runs_normally(app) -> None:  # type: ignore[no-untyped-def]
    """Outside a worker (no request id) report() records nothing and does not mean 'revoked'."""
    assert app.tasks["report_steps"](steps=2, delay=0) == {"status": "done", "steps": 2}
