"""`jobwire.attach(app)`: one app only, no side effects, clear refusals, one round trip."""

from __future__ import annotations

import subprocess
import sys
from weakref import WeakKeyDictionary

import httpx
import pytest
from celery import Celery
from celery import _state as celery_state
from celery.result import AsyncResult

import jobwire
from jobwire.server.celery_app import load_celery_app
from jobwire.settings import Settings, SettingsError
from jobwire.tasks import registry
from jobwire.tasks.recorder import Recorder
from tests.support import RedisServer, run_server
from tests.test_recorder import Monitor


def _app(url: str, name: str = "user") -> Celery:
    return Celery(name, broker=url, backend=url, set_as_current=False)


def test_import_has_no_side_effects() -> None:
    """`import jobwire` imports no Celery (clients stay light) and connects no signal."""
    out = subprocess.check_output(
        [sys.executable, "-c", "import sys, jobwire; print('celery' in sys.modules)"]
    )
    assert out.decode().strip() == "False"
    code = (
        "import jobwire.client, jobwire.tasks.progress, jobwire.tasks.signals;"
        "from celery.signals import before_task_publish as s; print(len(s.receivers or []))"
    )
    assert subprocess.check_output([sys.executable, "-c", code]).decode().strip() == "0"


def test_update_state_streams_in_one_round_trip(own_redis: RedisServer) -> None:
    """A plain task's update_state with a custom state: one EVALSHA writes Celery's result and
    the event; AsyncResult reads the meta exactly as stored."""
    app = jobwire.attach(_app(own_redis.url), Settings(redis_url=own_redis.url))

    @app.task(bind=True, name="seed")
    def seed(self):  # type: ignore[no-untyped-def]
        pass

    seed.push_request(id="seed-1", task="seed")
    try:
        seed.update_state(state="WARMING", meta={"step": 0, "total": 3})  # loads the script once
        monitor = Monitor(own_redis)
        seed.update_state(state="VALIDATING", meta={"step": 1, "total": 3, "description": "Validating input"})
        sent = monitor.stop()
    finally:
        seed.pop_request()
    assert sent == ["EVALSHA"]
    result = AsyncResult("seed-1", app=app)
    assert result.state == "VALIDATING"
    assert result.info == {"step": 1, "total": 3, "description": "Validating input"}
    hist = own_redis.client().zrange(Settings().keys.history("seed-1"), 0, -1)
    assert b'"progress":{"step":1,"total":3,"description":"Validating input","percent":33.33}' in hist[-1]
    app.close()


def test_attach_touches_that_app_only(own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """No set_default(); a second, unattached app publishing from a thread where it is current
    records nothing; the attached one does."""
    monkeypatch.setattr(registry, "_attached", WeakKeyDictionary())  # only this test's apps
    default_before = celery_state.default_app
    mine = jobwire.attach(_app(own_redis.url, "mine"), Settings(redis_url=own_redis.url))
    other = _app(own_redis.url, "other")
    assert celery_state.default_app is default_before
    keys = Settings().keys
    client = own_redis.client()
    try:
        other.set_current()
        other.send_task("t", task_id="other-1", queue="parked-other")
        mine.set_current()
        mine.send_task("t", task_id="mine-1", queue="parked-mine")
    finally:
        celery_state._set_current_app(None)
    assert client.hget(keys.job("mine-1"), "state") == b"PENDING"
    assert not client.exists(keys.job("other-1"))
    mine.close(), other.close()


def test_non_redis_backend_is_refused_with_what_degrades(own_redis: RedisServer) -> None:
    app = Celery("rpc", broker=own_redis.url, backend="rpc://", set_as_current=False)
    with pytest.raises(jobwire.AttachError) as err:
        jobwire.attach(app, Settings(redis_url=own_redis.url))
    message = str(err.value)
    assert "rpc://" in message and "not Redis" in message
    assert "update_state() calls do not stream" in message and "allow_other_backend=True" in message
    assert not registry.is_attached(app)
    jobwire.attach(app, Settings(redis_url=own_redis.url), allow_other_backend=True)
    assert registry.is_attached(app)
    app.close()


def test_backend_on_another_redis_is_refused(own_redis: RedisServer) -> None:
    app = _app(own_redis.url)
    with pytest.raises(jobwire.AttachError, match="point both at the same Redis database"):
        jobwire.attach(app, Settings(redis_url="redis://127.0.0.1:1/0"))
    app.close()


def test_jobwire_redis_defaults_to_the_backends(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With JOBWIRE_REDIS_URL unset, events go where Celery's results are."""
    monkeypatch.delenv("JOBWIRE_REDIS_URL", raising=False)
    app = jobwire.attach(_app(own_redis.url))
    assert registry.settings_for(app).redis_url == own_redis.url
    assert Recorder.for_app(app).client.connection_pool.connection_kwargs["port"] == own_redis.port
    app.close()


def test_a_sentinel_backend_is_followed_through_its_sentinels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Celery Sentinel backend: with JOBWIRE_REDIS_URL unset, jobwire (worker and server)
    asks the same sentinels for the same primary; set to something else, it is refused."""
    monkeypatch.delenv("JOBWIRE_REDIS_URL", raising=False)
    url = "sentinel://127.0.0.1:26379/2;sentinel://127.0.0.1:26380/2"
    app = Celery("s", broker="memory://", backend=url)
    app.conf.result_backend_transport_options = {"master_name": "mymaster"}
    jobwire.attach(app)
    target = registry.settings_for(app).redis_target
    assert (target.mode, target.master, target.db) == ("sentinel", "mymaster", 2)
    assert target.nodes == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    other = Celery("t", broker="memory://", backend=url)
    other.conf.result_backend_transport_options = {"master_name": "mymaster"}
    with pytest.raises(jobwire.AttachError, match="JOBWIRE_REDIS_SENTINEL_MASTER"):
        jobwire.attach(other, Settings(redis_url="redis://127.0.0.1:6379/2"))
    app.close()
    other.close()


async def test_server_with_a_users_app_submits_nothing_until_allowed(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOBWIRE_CELERY_APP names an app that never imported jobwire: the server attaches it,
    and lists and accepts no task until JOBWIRE_ALLOWED_TASKS names some."""
    monkeypatch.setenv("PLAIN_REDIS_URL", own_redis.url)
    monkeypatch.delitem(sys.modules, "tests.apps.plain", raising=False)
    settings = Settings(redis_url=own_redis.url, celery_app="tests.apps.plain:app")
    async with run_server(settings) as srv:
        assert registry.is_attached(srv.services.celery)
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await http.get("/api/v1/tasks")).json() == {"tasks": []}
            resp = await http.post("/api/v1/jobs", json={"task": "plain.seed"})
            assert resp.status_code == 422
            assert resp.json()["error"] == {
                "code": "task_not_allowed",
                "message": "task 'plain.seed' is not submittable; allowed: none",
            }
    allowed = Settings(
        redis_url=own_redis.url, celery_app="tests.apps.plain:app", allowed_tasks=("plain.seed",)
    )
    async with run_server(allowed) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        resp = await http.post("/api/v1/jobs", json={"task": "plain.seed"})
        assert resp.status_code == 202
        status = (await http.get(f"/api/v1/jobs/{resp.json()['job_id']}")).json()
        assert status["status"] == "PENDING" and status["task"] == "plain.seed"


def test_bad_celery_app_setting_says_what_to_change(own_redis: RedisServer) -> None:

    with pytest.raises(SettingsError, match="cannot import 'no_such_module'"):
        load_celery_app(Settings(celery_app="no_such_module:app"))
    with pytest.raises(SettingsError, match="not a Celery app"):
        load_celery_app(Settings(celery_app="tests.apps.plain:seed"))
