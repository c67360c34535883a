"""Large results: kept in object storage, only a reference in Redis and in events; downloads
through the server (Range, presigned S3 URLs); expiry cleanup; storage failures."""

from __future__ import annotations

import hashlib
import io
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import orjson
import pytest
import redis
from celery.result import AsyncResult
from moto.server import ThreadedMotoServer
from pypdf import PdfReader

from jobwire.settings import Settings
from jobwire.storage import FilesystemStore, S3Store, StorageError, cleanup, is_reference, reference
from jobwire.tasks.recorder import Recorder
from tests.clients import submit, watch_ws
from tests.support import RunningServer, Worker, free_port, run_server

pytestmark = pytest.mark.timeout(120)


async def test_a_20_mb_result_never_enters_redis(server: RunningServer, rclient: redis.Redis) -> None:
    job_id = await submit(server.url, "export_rows", rows=330_000)  # about 20 MB of JSON
    events = await watch_ws(server.ws_url, job_id)
    ref = events[-1]["result"]
    assert events[-1]["state"] == "SUCCESS" and is_reference(ref)
    assert ref["size_bytes"] > 20_000_000 and ref["content_type"] == "application/json"
    keys = server.services.settings.keys
    assert rclient.memory_usage(keys.job(job_id)) < 8_000
    assert rclient.memory_usage(keys.history(job_id)) < 16_000
    assert max(len(e) for e in rclient.zrange(keys.history(job_id), 0, -1)) < 4_000
    celery_key = server.services.celery.backend.get_key_for_task(job_id)
    assert rclient.strlen(celery_key) < 4_000
    # Celery's own API brings the value back: attaching jobwire changes nothing it returns.
    value = AsyncResult(job_id, app=server.services.celery).get(timeout=30)
    assert isinstance(value, list) and len(value) == 330_000
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        whole = await http.get(f"/api/v1/jobs/{job_id}/result")
        assert whole.status_code == 200
        assert whole.headers["content-type"].startswith("application/json")
        assert int(whole.headers["content-length"]) == ref["size_bytes"]
        assert whole.headers["content-disposition"] == 'attachment; filename="result.json"'
        assert hashlib.sha256(whole.content).hexdigest() == ref["sha256"]
        assert orjson.loads(whole.content) == value
        part = await http.get(f"/api/v1/jobs/{job_id}/result", headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == whole.content[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{ref['size_bytes']}"


async def test_small_results_stay_inline(server: RunningServer) -> None:
    job_id = await submit(server.url, "export_rows", rows=3)
    events = await watch_ws(server.ws_url, job_id)
    assert isinstance(events[-1]["result"], list) and len(events[-1]["result"]) == 3
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get(f"/api/v1/jobs/{job_id}/result")).json()["result"] == events[-1]["result"]
        running = await submit(server.url, delay=1.0)
        early = await http.get(f"/api/v1/jobs/{running}/result")
        assert early.status_code == 409 and early.json()["error"]["code"] == "no_result"


async def test_generate_report_is_a_real_pdf_with_the_pages_asked(server: RunningServer) -> None:
    job_id = await submit(server.url, "generate_report", pages=7)
    events = await watch_ws(server.ws_url, job_id)
    assert [e["progress"]["step"] for e in events if e["state"] == "RENDERING"] == list(range(7))
    ref = events[-1]["result"]
    assert ref["content_type"] == "application/pdf" and ref["filename"] == "report.pdf"
    async with httpx.AsyncClient(base_url=server.url) as http:
        pdf = (await http.get(f"/api/v1/jobs/{job_id}/result")).content
    assert len(PdfReader(io.BytesIO(pdf)).pages) == 7
    assert "page 3 of 7" in PdfReader(io.BytesIO(pdf)).pages[2].extract_text()


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A real S3-compatible server over HTTP on this machine (moto's)."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    conf = {
        "s3_endpoint_url": f"http://127.0.0.1:{port}",
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
        "s3_bucket": f"jobwire-{uuid.uuid4().hex[:8]}",
    }
    client = boto3.client(
        "s3",
        endpoint_url=conf["s3_endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=conf["s3_bucket"])
    yield conf
    server.stop()


async def test_s3_download_redirects_to_a_short_lived_presigned_url(
    settings: Settings, worker: object, s3: dict[str, str]
) -> None:
    """Real boto3 calls over HTTP: the object is stored, the server redirects to a presigned
    URL whose parameters say it expires, and that URL gives back the same bytes. (moto
    checks neither expiry nor signatures, so the URL's parameters are checked here.)"""
    s3_settings = settings.model_copy(update=dict(result_store="s3", result_url_ttl=120, **s3))
    store = S3Store(s3_settings)
    job_id = f"s3-{uuid.uuid4()}"
    data = bytes(range(256)) * 4096  # 1 MiB
    ref = reference(store, job_id, data, content_type="application/octet-stream", filename="blob.bin")
    recorder = Recorder(redis.Redis.from_url(settings.redis_url), settings)
    recorder.record(job_id, "PENDING")
    recorder.record(job_id, "SUCCESS", result=ref)
    async with run_server(s3_settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        resp = await http.get(f"/api/v1/jobs/{job_id}/result")
        assert resp.status_code == 307
        url = httpx.URL(resp.headers["location"])
        params = dict(url.params)
        assert params["X-Amz-Expires"] == "120" and params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
        assert (
            "X-Amz-Signature" in params
            and params["response-content-disposition"] == 'attachment; filename="blob.bin"'
        )
        assert url.path == f"/{s3['s3_bucket']}/jobwire/{job_id}/blob.bin"
        fetched = (await http.get(str(url))).content
    assert hashlib.sha256(fetched).hexdigest() == ref["sha256"]
    assert [o.key for o in store.list() if o.key.startswith(job_id)] == [f"{job_id}/blob.bin"]


def test_storage_failures_leave_no_reference(s3: dict[str, str], tmp_path: Path) -> None:
    missing = S3Store(Settings(result_store="s3", **{**s3, "s3_bucket": "no-such-bucket"}))
    with pytest.raises(StorageError, match="no-such-bucket"):
        reference(missing, "j", b"data", content_type="text/plain", filename="a.txt")
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's directory should be")
    with pytest.raises(StorageError, match="could not write"):
        reference(FilesystemStore(blocked), "j", b"data", content_type="text/plain", filename="a.txt")


def test_cleanup_removes_expired_and_orphans_and_runs_concurrently(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    alive = {f"alive-{i}" for i in range(5)}
    for job_id in alive | {f"gone-{i}" for i in range(200)}:
        reference(store, job_id, b"x" * 100, content_type="text/plain", filename="r.txt")
    errors: list[BaseException] = []
    counts: list[int] = []

    def run() -> None:
        try:
            counts.append(cleanup(store, lambda job_id: job_id in alive, max_age=3600))
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(o.key.split("/")[0] for o in store.list()) == sorted(alive)
    assert sum(counts) >= 200  # every orphan deleted (some by two cleanups at once: harmless)
    # While Celery holds a job's result, its object stays (Celery's result_expires, "never"
    # included), whatever jobwire's record and max_age say.
    assert cleanup(store, lambda job_id: False, max_age=0, result_exists=lambda job_id: job_id in alive) == 0
    assert cleanup(store, lambda job_id: job_id in alive, max_age=0) == 5  # past max_age: gone too


async def test_a_storage_failure_fails_the_job_clearly(
    server: RunningServer, session_redis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A worker whose store cannot be written: the job ends FAILURE saying why, and no
    reference to a missing object exists anywhere."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's directory should be")
    queue = f"broken-store-{uuid.uuid4().hex[:6]}"
    env = {"JOBWIRE_RESULT_DIR": str(blocked), "JOBWIRE_DEMO_QUEUE": queue}
    broken = Worker(session_redis.url, tmp_path / "w.log", concurrency=1, env=env, hostname=f"{queue}@%h")
    broken.start()
    try:
        celery = server.services.celery
        big = celery.send_task("export_rows", kwargs={"rows": 20_000}, queue=queue).id
        report = celery.send_task("generate_report", kwargs={"pages": 2}, queue=queue).id
        for job_id in (big, report):
            events = await watch_ws(server.ws_url, job_id)
            assert events[-1]["state"] == "FAILURE", events[-1]
            assert "could not write" in events[-1]["error"]["message"]
            assert not any(is_reference(e.get("result")) for e in events)
    finally:
        broken.stop()
