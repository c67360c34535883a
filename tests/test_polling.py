"""Polling endpoints: status, batch status (one round trip), listing, unknown ids."""

from __future__ import annotations

import uuid

import httpx
import redis

from tests.clients import submit, watch_ws
from tests.support import RunningServer


def _evalsha_and_hmget(client: redis.Redis) -> tuple[int, int, dict[str, int]]:
    stats = client.info("commandstats")
    calls = {k: v["calls"] for k, v in stats.items()}
    return calls.get("cmdstat_evalsha", 0), calls.get("cmdstat_hmget", 0), calls


async def test_batch_status_of_1000_ids_is_one_command(server: RunningServer, rclient: redis.Redis) -> None:
    """1,000 ids (known and unknown) are read by one EVALSHA; no per-id command from the server."""
    known = await submit(server.url, delay=0.01)
    await watch_ws(server.ws_url, known)
    ids = [known] + [f"missing-{i}-{uuid.uuid4()}" for i in range(999)]
    async with httpx.AsyncClient(base_url=server.url) as http:
        await http.post("/api/v1/jobs/batch-status", json={"job_ids": ids[:2]})  # load the script
        evalsha0, hmget0, before = _evalsha_and_hmget(rclient)
        resp = await http.post("/api/v1/jobs/batch-status", json={"job_ids": ids})
        evalsha1, hmget1, after = _evalsha_and_hmget(rclient)
    assert resp.status_code == 200
    jobs = resp.json()["jobs"]
    assert len(jobs) == 1000
    assert {k: v for k, v in jobs[known].items() if k != "epoch"} == {
        "status": "SUCCESS",
        "ready": True,
        "seq": 6,
    }
    assert jobs[known]["epoch"]  # names the incarnation the seq counts in
    assert jobs[ids[1]] == {"status": "UNKNOWN", "ready": False, "seq": 0}
    assert evalsha1 - evalsha0 == 1
    assert hmget1 - hmget0 == 1000  # inside that one script
    # Nothing else was sent on the server's behalf (INFO itself is ours; the worker is idle
    # but may poll the broker, so only look at the commands a status read could use).
    for cmd in ("cmdstat_hgetall", "cmdstat_hget", "cmdstat_get", "cmdstat_mget", "cmdstat_exists"):
        assert after.get(cmd, 0) == before.get(cmd, 0), cmd


async def test_batch_status_accepts_bare_array_and_caps_ids(server: RunningServer) -> None:
    """A bare JSON array works; 1,001 ids get 413 too_many_ids; bad ids get 422."""
    limit = server.services.settings.batch_max_ids
    async with httpx.AsyncClient(base_url=server.url) as http:
        ok = await http.post("/api/v1/jobs/batch-status", json=["a", "a", "b"])
        assert ok.status_code == 200 and set(ok.json()["jobs"]) == {"a", "b"}
        over = await http.post("/api/v1/jobs/batch-status", json=[f"j{i}" for i in range(limit + 1)])
        assert over.status_code == 413
        assert over.json()["error"]["code"] == "too_many_ids"
        bad = await http.post("/api/v1/jobs/batch-status", json={"job_ids": ["ok", "has\nnewline"]})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_job_id"
        notalist = await http.post("/api/v1/jobs/batch-status", json={"job_ids": "abc"})
        assert notalist.status_code == 422
        json_type = {"content-type": "application/json"}
        broken = await http.post("/api/v1/jobs/batch-status", content=b"{nope", headers=json_type)
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


async def test_unknown_job_is_404_not_eternal_pending(server: RunningServer) -> None:
    """A never-submitted id is 404 on status, history, SSE and revoke."""
    missing = f"never-{uuid.uuid4()}"
    async with httpx.AsyncClient(base_url=server.url) as http:
        for method, path in [
            ("GET", f"/api/v1/jobs/{missing}"),
            ("GET", f"/api/v1/jobs/{missing}/history"),
            ("GET", f"/api/v1/jobs/{missing}/events"),
            ("DELETE", f"/api/v1/jobs/{missing}"),
        ]:
            resp = await http.request(method, path)
            assert resp.status_code == 404, (method, path)
            assert resp.json()["error"]["code"] == "job_not_found"


async def test_listing_recent_jobs_paginates(server: RunningServer) -> None:
    """GET /api/v1/jobs lists newest first; next_before pages on without repeats."""
    ids = [await submit(server.url, delay=0.01) for _ in range(3)]
    async with httpx.AsyncClient(base_url=server.url) as http:
        first = (await http.get("/api/v1/jobs", params={"limit": 2})).json()
        second = (await http.get("/api/v1/jobs", params={"limit": 2, "before": first["next_before"]})).json()
        bad = await http.get("/api/v1/jobs", params={"limit": 0})
    listed = [j["job_id"] for j in first["jobs"] + second["jobs"]]
    assert listed[:3] == ids[::-1]
    assert len(set(listed)) == len(listed)
    assert bad.status_code == 422
