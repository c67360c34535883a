"""Attaching jobwire changes nothing Celery returns: big results read back through get(),
groups and chords; every result Celery can store; every task id Celery accepts; settings the
user set; writes Celery keeps; a failed event write."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest
import redis
from celery import Celery, chord, group
from celery import _state as celery_state
from celery.result import AsyncResult

import jobwire
from jobwire.client import watch
from jobwire.protocol import FAILURE, SUCCESS, dumps
from jobwire.settings import Settings
from jobwire.storage import is_reference
from jobwire.tasks.recorder import Recorder
from tests.apps.contract import make_app
from tests.clients import watch_ws, ws_job_events
from tests.support import (
    RedisServer,
    RunningServer,
    Worker,
    redis_server,
    run_server,
    settings_for,
    wait_until_sync,
)

pytestmark = pytest.mark.timeout(120)

OFFLOAD_BYTES = 1024  # low, so modest results take the object-store path


@pytest.fixture(scope="module", params=["json", "pickle"])
def contract_app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Celery]:
    """The contract app in a real prefork worker, and the same app here, both attached and
    offloading results over 1 KiB to one shared result directory; a Redis of its own per
    serializer (the tests reuse task ids)."""
    serializer = request.param
    results = tmp_path_factory.mktemp(f"results-{serializer}")
    env = {
        "CONTRACT_SERIALIZER": serializer,
        "JOBWIRE_RESULT_DIR": str(results),
        "JOBWIRE_RESULT_OFFLOAD_BYTES": str(OFFLOAD_BYTES),
        # Celery refuses to run a pickle-accepting worker as root (CI runs as root).
        **({"C_FORCE_ROOT": "1"} if serializer == "pickle" else {}),
    }
    log = Path(tmp_path_factory.mktemp("worker")) / "worker.log"
    with redis_server() as contract_redis:
        queue = f"contract-{serializer}"
        worker = Worker(contract_redis.url, log, env=env, app="tests.apps.contract_worker", queues=queue)
        worker.start()
        try:
            with pytest.MonkeyPatch.context() as mp:
                for name, value in {**env, "JOBWIRE_REDIS_URL": contract_redis.url}.items():
                    mp.setenv(name, value)
                app = make_app(serializer, contract_redis.url)
                app.set_current()  # the publishing app, among the apps attached in this process
                yield app
                celery_state._set_current_app(None)
                app.close()
        finally:
            worker.stop()


def _job_hash(app: Celery, job_id: str) -> dict[bytes, bytes]:
    recorder = Recorder.for_app(app)
    return recorder.client.hgetall(recorder.keys.job(job_id))  # type: ignore[no-any-return]


def test_a_big_result_reads_back_through_celery(contract_app: Celery) -> None:
    result = contract_app.tasks["contract.big"].delay(300_000)
    assert result.get(timeout=30) == "x" * 300_000
    fresh = AsyncResult(result.id, app=contract_app)
    assert fresh.result == "x" * 300_000 and fresh.info == "x" * 300_000
    # jobwire's event and job record carry the reference (the dashboard's download link).
    wait_until_sync(lambda: _job_hash(contract_app, result.id).get(b"final") == b"1", what="SUCCESS recorded")
    stored = orjson.loads(_job_hash(contract_app, result.id)[b"result"])
    assert is_reference(stored) and stored["size_bytes"] > 300_000


def test_groups_and_chords_of_big_results_give_the_values(contract_app: Celery) -> None:
    big, total = contract_app.tasks["contract.big"], contract_app.tasks["contract.total"]
    joined = group(big.s(5000), big.s(10)).apply_async().get(timeout=30)
    assert joined == ["x" * 5000, "x" * 10]
    assert chord([big.s(4000), big.s(3000)])(total.s()).get(timeout=30) == 7000
    # The chord's own result is big too: its body gets the values, its reader the value.
    assert chord([big.s(2000)])(big.si(6000)).get(timeout=30) == "x" * 6000


def test_results_json_encoders_refuse_still_succeed(contract_app: Celery) -> None:
    tasks = contract_app.tasks
    fact = tasks["contract.factorial"].delay(25)
    assert fact.get(timeout=30) == math.factorial(25) and fact.state == SUCCESS
    wait_until_sync(lambda: _job_hash(contract_app, fact.id).get(b"final") == b"1", what="SUCCESS recorded")
    event = orjson.loads(_job_hash(contract_app, fact.id)[b"event"].decode())
    assert event["state"] == SUCCESS
    assert str(math.factorial(25)) in _job_hash(contract_app, fact.id)[b"event"].decode()  # exact
    deep = tasks["contract.deep"].delay(300)
    value = deep.get(timeout=30)
    for _ in range(300):
        (value,) = value
    assert value == [] and deep.state == SUCCESS
    if contract_app.conf.result_serializer == "pickle":
        keyed = tasks["contract.tuple_keys"].delay()
        assert keyed.get(timeout=30) == {(1, 2): "pair", ("a",): [1, 2]}


@pytest.mark.parametrize(
    "job_id",
    ["order 42/ü {x}", "x}:events", "~not-encoded", "..", "line\nbreak", "long-" + "é" * 1500],
    ids=["spaces-slash-unicode-braces", "brace-key", "tilde", "dots", "control", "long"],
)
def test_every_task_id_celery_accepts_streams(contract_app: Celery, job_id: str) -> None:
    result = contract_app.tasks["contract.steps"].apply_async((3,), task_id=job_id)
    assert result.get(timeout=30) == "done"
    recorder = Recorder.for_app(contract_app)
    # jobwire records SUCCESS from Celery's task_success signal, just after Celery's write.
    wait_until_sync(lambda: _job_hash(contract_app, job_id).get(b"final") == b"1", what="SUCCESS recorded")
    history = [orjson.loads(e) for e in recorder.client.zrange(recorder.keys.history(job_id), 0, -1)]
    assert [e["state"] for e in history] == [
        "PENDING",
        "STARTED",
        "STEPPING",
        "STEPPING",
        "STEPPING",
        SUCCESS,
    ]
    assert {e["job_id"] for e in history} == {job_id}


@pytest.mark.parametrize("job_id", ["../outside", "a/b/c", "/abs", "big-" + "é" * 1500])
def test_big_results_of_any_task_id_stay_in_the_store(contract_app: Celery, job_id: str) -> None:
    """Object paths carry the id's key form: never outside the store, never too long a name."""
    result = contract_app.tasks["contract.big"].apply_async((3000,), task_id=job_id)
    assert result.get(timeout=30) == "x" * 3000


def test_a_chord_whose_header_ids_need_encoding_completes(contract_app: Celery) -> None:
    add, total = contract_app.tasks["contract.add"], contract_app.tasks["contract.total"]
    header = [add.s(1, 2).set(task_id="part {1}"), add.s(3, 0).set(task_id="part {2} ü")]
    assert chord(header)(total.s()).get(timeout=30) == 6
    assert _job_hash(contract_app, "part {1}")[b"state"] == SUCCESS.encode()  # recorded before the callback


def test_an_explicit_task_track_started_false_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    app = Celery(
        "tracked", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0", set_as_current=False
    )
    app.conf.task_track_started = False
    with caplog.at_level(logging.WARNING, logger="jobwire"):
        jobwire.attach(app, Settings(redis_url="redis://127.0.0.1:1/0"))
    assert app.conf.task_track_started is False
    assert "task_track_started=False is kept" in caplog.text
    unset = Celery("default", backend="redis://127.0.0.1:1/0", set_as_current=False)
    jobwire.attach(unset, Settings(redis_url="redis://127.0.0.1:1/0"))
    assert unset.conf.task_track_started is True  # left to Celery's default: turned on
    app.close(), unset.close()


def test_result_backend_changed_after_attach_is_honoured(own_redis: RedisServer) -> None:
    """attach() caches no backend in the calling thread (Celery's own suite changes
    result_backend after the app is set up)."""
    app = Celery("later", backend=own_redis.url, set_as_current=False)
    jobwire.attach(app, Settings(redis_url=own_redis.url))
    assert app._backend is None
    app.conf.result_backend = own_redis.url.replace("/0", "/3")
    assert app.backend.connparams["db"] == 3
    app.close()


def test_custom_states_are_dropped_only_where_celery_drops_them(own_redis: RedisServer) -> None:
    app = jobwire.attach(
        Celery("late", backend=own_redis.url, set_as_current=False), Settings(redis_url=own_redis.url)
    )

    @app.task(bind=True, name="late")
    def late(self):  # type: ignore[no-untyped-def]
        pass

    recorder = Recorder.for_app(app)
    for job_id, final in (("late-failed", FAILURE), ("late-succeeded", SUCCESS)):
        late.push_request(id=job_id, task="late")
        try:
            late.update_state(state="WORKING", meta={"step": 1})
            if final == SUCCESS:
                app.backend.mark_as_done(job_id, 1)
                recorder.record(job_id, SUCCESS, result=1)
            else:
                app.backend.mark_as_failure(job_id, ValueError("no"))
                recorder.record(job_id, FAILURE, error={"type": "ValueError", "message": "no"})
            late.update_state(state="LATE", meta={"step": 2})
        finally:
            late.pop_request()
        assert recorder.client.hget(recorder.keys.job(job_id), "state") == final.encode()  # final stays
    # Celery stores a write after FAILURE, and drops one after SUCCESS: so does jobwire.
    assert AsyncResult("late-failed", app=app).state == "LATE"
    assert AsyncResult("late-succeeded", app=app).state == SUCCESS
    app.close()


def test_a_failed_event_write_leaves_celerys_result_stored(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """jobwire's script cannot run (a user without scripting rights): update_state() does
    not raise, Celery's result is stored as plain Celery stores it, and the log says why."""
    admin = own_redis.client()
    admin.acl_setuser(
        "noscripts",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-@scripting"],
    )
    url = f"redis://noscripts:pw@127.0.0.1:{own_redis.port}/0"
    app = jobwire.attach(Celery("blip", backend=url, set_as_current=False), Settings(redis_url=url))

    @app.task(bind=True, name="blip")
    def blip(self):  # type: ignore[no-untyped-def]
        pass

    blip.push_request(id="blip-1", task="blip")
    try:
        with caplog.at_level(logging.ERROR, logger="jobwire"):
            blip.update_state(state="WORKING", meta={"step": 1, "total": 2})
            app.backend.store_result("blip-1", "done", SUCCESS, request=blip.request)
    finally:
        blip.pop_request()
    result = AsyncResult("blip-1", app=app)
    assert result.state == SUCCESS and result.result == "done"
    assert "could not record" in caplog.text
    app.close()


async def test_any_task_id_is_reachable_on_every_endpoint(server: RunningServer) -> None:
    """An id with '/', spaces, braces and non-ASCII: its status, history, SSE, /ws/jobs/{id},
    /ws and the Python client's watch() all serve it (ids percent-encoded in paths)."""
    job_id = f"order 42/ü {{{uuid.uuid4().hex[:8]}}}"
    recorder = Recorder(redis.Redis.from_url(server.services.settings.redis_url), server.services.settings)
    recorder.record(job_id, "PENDING", task="odd")
    recorder.record(job_id, "STEPPING", progress={"step": 1, "total": 2})
    recorder.record(job_id, SUCCESS, result="done")
    path = f"/api/v1/jobs/{quote(job_id, safe='')}"
    async with httpx.AsyncClient(base_url=server.url) as http:
        status = (await http.get(path)).json()
        assert status["job_id"] == job_id and status["status"] == SUCCESS
        history = (await http.get(f"{path}/history")).json()
        assert [e["state"] for e in history["events"]] == ["PENDING", "STEPPING", SUCCESS]
        sse = await http.get(f"{path}/events")
        assert sse.status_code == 200 and '"state":"SUCCESS"' in sse.text
    assert [e["seq"] for e in await watch_ws(server.ws_url, job_id)] == [1, 2, 3]
    assert [e["seq"] for e in await ws_job_events(f"{server.ws_url}/ws/jobs/{quote(job_id, safe='')}")] == [
        1,
        2,
        3,
    ]
    assert [e["state"] async for e in watch(job_id, url=server.url)] == ["PENDING", "STEPPING", SUCCESS]


async def test_integers_past_a_doubles_range_succeed_and_read_back_as_digits(contract_app: Celery) -> None:
    """A task whose progress and result hold integers past a double's range: orjson, which
    reads jobwire's records, refused them (500 on the job's status and history, a broken
    /ws/jobs). The task succeeds with Celery's value untouched; jobwire's copy holds their
    exact digits, as strings, on every endpoint."""
    value = -(10**400) - 7
    result = contract_app.tasks["contract.huge"].delay(400)
    assert result.get(timeout=30) == value and result.state == SUCCESS
    wait_until_sync(lambda: _job_hash(contract_app, result.id).get(b"final") == b"1", what="SUCCESS recorded")
    async with run_server(settings_for(contract_app.conf.broker_url)) as srv:
        path = f"/api/v1/jobs/{result.id}"
        async with httpx.AsyncClient(base_url=srv.url) as http:
            status = await http.get(path)
            assert status.status_code == 200, status.text
            assert status.json()["status"] == SUCCESS and status.json()["result"] == str(value)
            history = await http.get(f"{path}/history")
            assert history.status_code == 200, history.text
            [counting] = [e for e in history.json()["events"] if e["state"] == "COUNTING"]
            assert counting["progress"]["count"] == str(10**400)
        events = await ws_job_events(f"{srv.ws_url}/ws/jobs/{result.id}")
        assert events[-1]["state"] == SUCCESS and events[-1]["result"] == str(value)


def test_what_an_event_writes_orjson_reads_back_exactly() -> None:
    """Integers past 64 bits become their digits (past Python's 4300-digit limit on
    int-to-str too, where `str` raises), in values and keys; the rest stays numbers."""
    huge = 10**5000 + 1
    written = dumps({"huge": huge, "top": 2**64 - 1, "low": -(2**63), "under": -(2**63) - 1, 10**400: [1]})
    assert orjson.loads(written) == {
        "huge": str(Decimal(huge)),
        "top": 2**64 - 1,
        "low": -(2**63),
        "under": "-9223372036854775809",
        "1" + "0" * 400: [1],
    }
