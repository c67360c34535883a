"""Distributed task rate limits, with the session's real worker (two processes).

The claims measured, not assumed: a bucket of R/s and burst C runs at most C + R·T jobs in
any T seconds and at least 90% of that; one tenant's flood does not slow another tenant;
a waiting job says so on every transport; bad limits are refused and change nothing.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import redis
from celery.result import AsyncResult
from celery.utils.time import rate

from jobwire.tasks.throttle import define_limit
from tests.clients import watch_ws
from tests.support import RunningServer, Worker, wait_until

pytestmark = pytest.mark.timeout(120)


def _all_done(celery, ids: list[str]) -> bool:  # type: ignore[no-untyped-def]
    return all(AsyncResult(i, app=celery).ready() for i in ids)


async def test_bucket_bounds_the_rate_across_workers(server: RunningServer) -> None:
    celery = server.services.celery
    name, rate, burst, window = f"bound-{uuid.uuid4().hex[:8]}", 5, 5, 3.0
    define_limit(celery, name, f"{rate}/s", burst=burst)
    ids = [celery.send_task("limited_call", kwargs={"limit": name}).id for _ in range(30)]
    await wait_until(lambda: _all_done(celery, ids), what="every limited job ran", timeout=60)
    ran = sorted(AsyncResult(i, app=celery).result for i in ids)
    bound = burst + rate * window
    busiest = max(sum(1 for t in ran if start <= t <= start + window) for start in ran)
    assert busiest <= bound, f"{busiest} jobs ran within {window}s; the bucket allows {bound}"
    first_window = sum(1 for t in ran if t <= ran[0] + window)
    assert first_window >= 0.9 * bound, (
        f"only {first_window} of {bound} allowed jobs ran in the first {window}s"
    )


async def test_one_tenants_flood_does_not_starve_another(server: RunningServer) -> None:
    celery = server.services.celery
    name = f"fair-{uuid.uuid4().hex[:8]}"
    define_limit(celery, name, "2/s", burst=2)
    kwargs = {"limit": name, "per": "tenant"}
    flood = [
        celery.send_task("limited_call", kwargs=kwargs, headers={"jobwire_tenant": "big"}).id
        for _ in range(20)
    ]
    sent = time.time()
    small = [
        celery.send_task("limited_call", kwargs=kwargs, headers={"jobwire_tenant": "small"}).id
        for _ in range(2)
    ]
    await wait_until(lambda: _all_done(celery, small), what="the small tenant's jobs ran", timeout=30)
    small_ran = max(AsyncResult(i, app=celery).result for i in small)
    assert small_ran - sent < 2.0  # its own burst: not behind the 20 of the other tenant
    await wait_until(lambda: _all_done(celery, flood), what="the flood ran", timeout=60)
    flood_ran = sorted(AsyncResult(i, app=celery).result for i in flood)
    assert flood_ran[-1] - flood_ran[0] >= (20 - 2) / 2 * 0.9  # the big tenant at its own 2/s


async def test_waiting_shows_on_every_transport(server: RunningServer) -> None:
    celery = server.services.celery
    name = f"visible-{uuid.uuid4().hex[:8]}"
    define_limit(celery, name, "1/s", burst=1)
    ids = [celery.send_task("limited_call", kwargs={"limit": name}).id for _ in range(3)]
    waiting_job = ids[-1]
    events = await watch_ws(server.ws_url, waiting_job)
    states = [e["state"] for e in events]
    assert "RATE_LIMITED" in states and states[-1] == "SUCCESS"
    waiting = events[states.index("RATE_LIMITED")]["progress"]
    assert waiting["reason"] == "rate_limited" and waiting["limit"] == name
    assert waiting["retry_at"] > events[states.index("RATE_LIMITED")]["ts"]
    assert "RETRY" not in states  # waiting is not a retry: max_retries is untouched
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        history = (await http.get(f"/api/v1/jobs/{waiting_job}/history")).json()["events"]
        assert [e["state"] for e in history] == states  # polling sees the same
        sse_states = []
        async with http.stream("GET", f"/api/v1/jobs/{waiting_job}/events") as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    sse_states.append(json.loads(line[6:])["state"])
        assert sse_states == states
        limits = (await http.get("/api/v1/admin/rate-limits")).json()["limits"]
        assert {"name": name, "rate": "1/s", "burst": 1} == {
            k: v for k, v in next(x for x in limits if x["name"] == name).items() if k != "waiting"
        }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"rate": "abc"}, "rate must look like '100/m'"),
        ({"rate": "-1/s"}, "rate must look like '100/m'"),
        ({"rate": "1/fortnight"}, "rate must look like '100/m'"),
        ({"rate": "0/m"}, "must be above zero"),
        ({"rate": "5/s", "burst": 0}, "burst must be"),
        ({"rate": "5/s", "extra": 1}, "unknown fields: extra"),
    ],
)
async def test_bad_limits_are_422_and_change_nothing(
    server: RunningServer, rclient: redis.Redis, body: dict, message: str
) -> None:
    name = f"strict-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.put(f"/api/v1/admin/rate-limits/{name}", json={"rate": "7/m"})).status_code == 200
        before = rclient.hgetall(server.services.settings.keys.limit(name))
        resp = await http.put(f"/api/v1/admin/rate-limits/{name}", json=body)
    assert resp.status_code == 422, resp.text
    assert message in resp.json()["error"]["message"]
    assert rclient.hgetall(server.services.settings.keys.limit(name)) == before


def _applied(celery, task: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Each worker's rate limit for `task`, as the worker itself reports it."""
    replies = celery.control.inspect(timeout=1.0).registered("rate_limit") or {}
    out = {}
    for node, tasks in replies.items():
        for entry in tasks:
            if entry.startswith(f"{task} "):
                out[node] = entry.split("rate_limit=", 1)[1].rstrip("]")
    return out


async def test_celery_limits_scale_restore_and_reach_later_workers(
    server: RunningServer, session_redis, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Scaling "1/m" by 0.5 gives a real, lower, non-zero limit (never Celery's "0 = none");
    a worker started after the change obeys it; restoring gives back the declared one."""
    celery = server.services.celery
    async with httpx.AsyncClient(base_url=server.url) as http:
        scaled = (await http.post("/api/v1/admin/rate-limits/celery", json={"factor": 0.5})).json()["scaled"]
        assert scaled["digest_email"] == "30/h"
        assert 0 < rate("30/h") < rate("1/m")
        await wait_until(
            lambda: set(_applied(celery, "digest_email").values()) == {"30/h"},
            what="the running worker applies it",
        )
        later = Worker(
            session_redis.url,
            tmp_path / "later.log",
            concurrency=1,
            hostname=f"later-{uuid.uuid4().hex[:6]}@%h",
        )
        later.start()
        try:
            await wait_until(
                lambda: any(
                    n.startswith("later-") and v == "30/h"
                    for n, v in _applied(celery, "digest_email").items()
                ),
                what="a worker started after the change obeys it",
            )
            restored = (await http.post("/api/v1/admin/rate-limits/celery", json={"restore": True})).json()[
                "restored"
            ]
            assert restored["digest_email"] == "1/m"
            await wait_until(
                lambda: set(_applied(celery, "digest_email").values()) == {"1/m"},
                what="every worker is back to 1/m",
            )
            listing = (await http.get("/api/v1/admin/rate-limits/celery")).json()["tasks"]
            assert {"task": "digest_email", "declared": "1/m", "rate": "1/m"} in listing
        finally:
            later.stop()


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/celery/no_such_task", {"rate": "5/m"}, "unknown task 'no_such_task'"),
        ("/celery/digest_email", {"rate": "abc"}, "must look like '100/m'"),
        ("/celery/digest_email", {"rate": "0/m"}, "above zero"),
        ("/celery", {"factor": 0}, "factor must be a number > 0"),
        ("/celery", {"factor": -1}, "factor must be a number > 0"),
    ],
)
async def test_bad_celery_limits_are_422_and_change_nothing(
    server: RunningServer, rclient: redis.Redis, path: str, body: dict, message: str
) -> None:
    key = server.services.settings.keys.celery_limits
    before = rclient.hgetall(key)
    async with httpx.AsyncClient(base_url=server.url) as http:
        method = "POST" if path == "/celery" else "PUT"
        resp = await http.request(method, f"/api/v1/admin/rate-limits{path}", json=body)
    assert resp.status_code == 422, resp.text
    assert message in resp.json()["error"]["message"]
    assert rclient.hgetall(key) == before
