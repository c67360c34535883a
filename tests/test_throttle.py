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

from jobwire.tasks.throttle import define_limit
from tests.clients import watch_ws
from tests.support import RunningServer, wait_until

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
    print(f"\nbucket {rate}/s burst {burst}, {window}s: busiest window {busiest}, first window {first_window}, bound {bound}")
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
