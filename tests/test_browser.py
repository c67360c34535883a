"""The dashboard in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
import redis
from playwright.async_api import Browser, Page, Route, expect

from jobwire.settings import Settings
from jobwire.tasks.recorder import Owner, Recorder
from jobwire.tasks.throttle import define_limit
from tests.clients import LIFECYCLE, assert_gap_free, transitions
from tests.support import RedisServer, RunningServer, Worker, free_port, run_server, settings_for, wait_until
from tests.test_auth import AUDIENCE, SECRET, submit_as, token

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if os.environ.get("JOBWIRE_SKIP_BROWSER") and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser tests: unset JOBWIRE_SKIP_BROWSER")
if os.environ.get("JOBWIRE_SKIP_BROWSER"):
    pytest.skip(
        "JOBWIRE_SKIP_BROWSER is set: the browser tests were skipped on purpose", allow_module_level=True
    )
if not os.path.exists(CHROMIUM):
    # Never a silent pass without them: `make test` installs chromium where it can.
    raise RuntimeError(
        "the browser tests need Debian's chromium: run `sudo apt-get install chromium` "
        "(or set JOBWIRE_SKIP_BROWSER=1 to skip them on purpose)"
    )

# As root and with no network beyond loopback, Chromium needs these to start quietly.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def open_dashboard(browser: Browser, url: str) -> Page:
    page = await browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url)
    await page.wait_for_selector("#task option", state="attached")
    return page


async def run_job(page: Page, task: str = "long_running_task", delay: float = 0.3) -> str:
    """Submit from the form; return the new job's id (the row it adds)."""
    before = set(await page.eval_on_selector_all(".job", "rows => rows.map(r => r.dataset.jobId)"))
    await page.select_option("#task", task)
    await page.fill("#delay", str(delay))
    await page.click("#submit")
    for _ in range(200):
        now = await page.eval_on_selector_all(".job", "rows => rows.map(r => r.dataset.jobId)")
        new = [j for j in now if j not in before]
        if new:
            return str(new[0])
        await asyncio.sleep(0.05)
    raise AssertionError("no row appeared for the submitted job")


def row(page: Page, job_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f'.job[data-job-id="{job_id}"]')


async def timeline(page: Page, job_id: str) -> list[tuple[int, str]]:
    items = (
        await row(page, job_id)
        .locator(".timeline li")
        .evaluate_all("lis => lis.map(li => [Number(li.dataset.seq), li.dataset.state])")
    )
    return [tuple(i) for i in items]


def full_story() -> list[tuple[int, str]]:
    return list(enumerate(LIFECYCLE, start=1))


async def test_submit_from_dashboard_reaches_success(
    browser: Browser, settings: Settings, worker: object
) -> None:
    """Run a job from the form: the bar reaches 100%, the badge SUCCESS, the timeline has every step."""
    async with run_server(settings) as srv:
        page = await open_dashboard(browser, srv.url)
        await expect(page.locator("#connection")).to_have_attribute("data-status", "live")
        await expect(page.locator("#connection")).to_have_attribute("data-transport", "websocket")
        job_id = await run_job(page, delay=0.4)
        job = row(page, job_id)
        # Mid-job the bar shows the work done so far (polled every animation frame).
        await page.wait_for_function(
            """id => {
                const row = document.querySelector(`.job[data-job-id="${id}"]`);
                return row && row.dataset.state === "PROCESSING"
                    && row.querySelector(".progress").getAttribute("aria-valuenow") === "66.67";
            }""",
            arg=job_id,
            timeout=10000,
        )
        await expect(job.locator(".state")).to_have_text("SUCCESS", timeout=15000)
        await expect(job.locator(".progress")).to_have_attribute("aria-valuenow", "100")
        await expect(job.locator(".outcome")).to_contain_text('"status":"done"')
        await expect(job.locator(".cancel")).to_be_hidden()
        assert await timeline(page, job_id) == full_story()
        assert page.errors == []  # type: ignore[attr-defined]


async def test_cancel_from_dashboard_shows_revoked(
    browser: Browser, settings: Settings, worker: object
) -> None:
    """Cancel a running job: REVOKED appears and the cancel button goes away."""
    async with run_server(settings) as srv:
        page = await open_dashboard(browser, srv.url)
        job_id = await run_job(page, delay=3)
        job = row(page, job_id)
        await expect(job.locator(".state")).to_have_text("VALIDATING", timeout=10000)
        await job.locator(".cancel").click()
        await expect(job.locator(".state")).to_have_text("REVOKED", timeout=10000)
        await expect(job.locator(".cancel")).to_be_hidden()
        await expect(job.locator(".outcome")).to_contain_text("TaskRevokedError")


async def test_page_survives_server_restart_mid_job(
    browser: Browser, settings: Settings, worker: object
) -> None:
    """The web server restarts mid-job: the page reconnects and shows every transition, once."""
    port = free_port()
    async with run_server(settings, port) as srv:
        page = await open_dashboard(browser, srv.url)
        job_id = await run_job(page, delay=0.8)
        await expect(row(page, job_id).locator(".state")).to_have_text("VALIDATING", timeout=10000)
    # The server is gone while the job moves on.
    await expect(page.locator("#connection")).to_have_attribute("data-status", "reconnecting")
    store = redis.Redis.from_url(settings.redis_url)
    job_key = settings.keys.job(job_id)
    await wait_until(
        lambda: store.hget(job_key, "state") in (b"UPLOADING", b"SUCCESS"),
        what="the job moves on while the server is down",
    )
    store.close()
    async with run_server(settings, port):
        await expect(page.locator("#connection")).to_have_attribute("data-status", "live", timeout=15000)
        await expect(page.locator("#connection")).to_have_attribute("data-transport", "websocket")
        await expect(row(page, job_id).locator(".state")).to_have_text("SUCCESS", timeout=15000)
        assert await timeline(page, job_id) == full_story()


@pytest.mark.parametrize(("offered", "expected"), [(("sse", "polling"), "sse"), (("polling",), "polling")])
async def test_falls_back_when_websockets_are_refused(
    browser: Browser, settings: Settings, worker: object, offered: tuple[str, ...], expected: str
) -> None:
    """Websocket upgrades refused (and SSE too, for polling): the page falls back and still finishes."""
    async with run_server(settings.model_copy(update=dict(transports=offered))) as srv:
        page = await open_dashboard(browser, srv.url)
        await expect(page.locator("#connection")).to_have_attribute("data-transport", expected, timeout=20000)
        await expect(page.locator("#connection")).to_have_attribute("data-status", "live")
        job_id = await run_job(page, delay=0.3)
        await expect(row(page, job_id).locator(".state")).to_have_text("SUCCESS", timeout=20000)
        assert await timeline(page, job_id) == full_story()


async def test_group_shows_its_aggregate_and_its_children(
    browser: Browser, settings: Settings, worker: Worker
) -> None:
    """A group of 30: one row whose bar is the aggregate, children listed underneath
    (collapsed, as there are many), fetched when opened."""
    async with run_server(settings) as srv:
        page = await open_dashboard(browser, srv.url)
        body = {"group": [{"task": "plain_sum", "args": [[i]], "kwargs": {"delay": 0.05}} for i in range(30)]}
        resp = await page.request.post(f"{srv.url}/api/v1/jobs", data=body)
        assert resp.status == 202
        group_id = (await resp.json())["job_id"]
        job = row(page, group_id)
        await expect(job.locator(".state")).to_have_text("SUCCESS", timeout=30000)
        await expect(job.locator(".description")).to_have_text("30 of 30 done")
        await expect(job.locator(".percent")).to_have_text("100%")
        children = job.locator(".children")
        await expect(children.locator("summary")).to_have_text("30 children")
        assert await children.evaluate("d => d.open") is False
        await children.locator("summary").click()
        await expect(children.locator(".child-list li")).to_have_count(30)
        states = await children.locator(".child-list .state").all_text_contents()
        assert states == ["SUCCESS"] * 30
        child_ids = await children.locator(".child-list code").all_text_contents()
        shown = await page.eval_on_selector_all(".job", "rows => rows.map(r => r.dataset.jobId)")
        assert not set(child_ids) & set(shown), "children are listed under their group, not as rows"
        assert page.errors == []  # type: ignore[attr-defined]


async def test_burst_of_events_renders_every_transition(browser: Browser, settings: Settings) -> None:
    """3,000 progress events in a burst: the page ends on SUCCESS with every event counted
    once, delivered or coalesced into a newer one."""
    settings = settings.model_copy(update=dict(history_limit=5000))
    redis_client = redis.Redis.from_url(settings.redis_url)
    recorder = Recorder(redis_client, settings)
    job_id = f"burst-{os.urandom(4).hex()}"
    recorder.record(job_id, "PENDING", task="burst")
    async with run_server(settings) as srv:
        page = await open_dashboard(browser, srv.url)
        await expect(row(page, job_id).locator(".state")).to_have_text("PENDING", timeout=10000)
        pipe = redis_client.pipeline(transaction=False)
        for step in range(1, 3001):
            recorder.record(job_id, "WORKING", progress={"step": step, "total": 3000}, pipe=pipe)
        pipe.execute()
        recorder.record(job_id, "SUCCESS", result={"steps": 3000})
        job = row(page, job_id)
        await expect(job.locator(".state")).to_have_text("SUCCESS", timeout=20000)
        assert await page.evaluate(f"window.jobwire.client.lastSeq({job_id!r})") == 3002
        counts = await job.locator(".timeline li").evaluate_all(
            "lis => lis.map(li => [li.dataset.state, Number(li.dataset.count)])"
        )
        assert counts == [["PENDING", 1], ["WORKING", 3000], ["SUCCESS", 1]]
        assert page.errors == []  # type: ignore[attr-defined]
    redis_client.close()


async def test_climbs_back_to_websocket_when_it_returns(
    browser: Browser, settings: Settings, worker: object
) -> None:
    """Fallen back to SSE while websockets were refused, the page returns to WebSocket once they work."""
    port = free_port()
    async with run_server(settings.model_copy(update=dict(transports=("sse", "polling"))), port) as srv:
        page = await open_dashboard(browser, f"{srv.url}/?upgrade=1000")
        await expect(page.locator("#connection")).to_have_attribute("data-transport", "sse", timeout=20000)
        job_id = await run_job(page, delay=1.0)
        await expect(row(page, job_id).locator(".state")).to_have_text("VALIDATING", timeout=10000)
    async with run_server(settings, port):
        await expect(page.locator("#connection")).to_have_attribute(
            "data-transport", "websocket", timeout=20000
        )
        await expect(page.locator("#connection")).to_have_attribute("data-status", "live")
        await expect(row(page, job_id).locator(".state")).to_have_text("SUCCESS", timeout=15000)
        assert await timeline(page, job_id) == full_story()


async def test_dashboard_with_a_token_sees_its_tenant_only(
    browser: Browser, settings: Settings, worker: object
) -> None:
    """With JOBWIRE_AUTH=jwt the dashboard takes a token from its address (then removes it
    from the address bar), submits and watches over an authenticated websocket, and lists
    only its tenant's jobs."""
    secured = settings.model_copy(update=dict(auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE))
    async with run_server(secured) as srv:
        theirs = await submit_as(srv, token("globex", "bob"), delay=0.01)
        user = token("acme", f"dashboard-{uuid.uuid4()}")  # a submit budget of its own
        page = await open_dashboard(browser, f"{srv.url}/?token={user}")
        assert "token" not in page.url
        await expect(page.locator("#connection")).to_have_attribute("data-status", "live")
        job_id = await run_job(page, delay=0.1)
        await expect(row(page, job_id).locator(".state")).to_have_text("SUCCESS", timeout=15000)
        assert await page.locator(f'.job[data-job-id="{theirs}"]').count() == 0
        assert not page.errors  # type: ignore[attr-defined]


async def test_dashboard_lists_a_job_created_before_its_all_jobs_stream_was_live(
    browser: Browser, settings: Settings
) -> None:
    """Subscribe, then list: a job created after the dashboard loaded its listing but before
    its all-jobs subscription was confirmed reaches no live stream; the dashboard lists it
    again once the subscription is confirmed. (The dashboard's subscribe_all is held back
    at the socket until the job exists.)"""
    async with run_server(settings) as srv:
        held: list[str] = []
        sockets: list[object] = []

        async def hold_subscribe_all(ws) -> None:  # type: ignore[no-untyped-def]
            server = ws.connect_to_server()
            sockets.append(server)

            def from_page(message: str | bytes) -> None:
                if isinstance(message, str) and '"subscribe_all"' in message:
                    held.append(message)
                else:
                    server.send(message)

            ws.on_message(from_page)
            server.on_message(lambda message: ws.send(message))

        page = await browser.new_page()
        await page.route_web_socket(re.compile(r"/ws$"), hold_subscribe_all)
        async with page.expect_response(lambda r: "/api/v1/jobs?limit=" in r.url):
            await page.goto(srv.url)
        await wait_until(lambda: bool(held), what="the dashboard asks for the all-jobs stream")
        job_id = f"early-{uuid.uuid4().hex[:8]}"
        Recorder(redis.Redis.from_url(settings.redis_url), settings).record(job_id, "PENDING")
        sockets[0].send(held[0])  # type: ignore[attr-defined]
        await expect(row(page, job_id)).to_be_visible(timeout=10000)


async def test_dashboard_shows_waiting_for_quota_and_the_limits(
    browser: Browser, settings: Settings, worker: object
) -> None:
    """A job held by a rate limit reads "waiting for quota · retry in N s", and the limits
    panel lists the limit with the jobs waiting on it."""

    async with run_server(settings) as srv:
        name = f"dash-{uuid.uuid4().hex[:6]}"
        celery = srv.services.celery
        define_limit(celery, name, "1/m", burst=1)
        page = await open_dashboard(browser, srv.url)
        ids = [celery.send_task("limited_call", kwargs={"limit": name}).id for _ in range(2)]
        store = redis.Redis.from_url(settings.redis_url)
        states: list[bytes | None] = []

        def one_waits() -> bool:
            states[:] = [store.hget(settings.keys.job(j), "state") for j in ids]
            return b"RATE_LIMITED" in states

        await wait_until(one_waits, what="one of the two jobs waits for the single token")
        waiting = ids[states.index(b"RATE_LIMITED")]
        store.close()
        description = row(page, waiting).locator(".description")
        await expect(description).to_contain_text(f"waiting for quota ({name}) · retry in", timeout=15000)
        limits = page.locator("#limits")
        await expect(limits).to_be_visible(timeout=10000)
        limit_row = limits.locator("tr", has_text=name)
        await expect(limit_row).to_contain_text("1/m")
        await expect(limit_row.locator("td").nth(3)).to_have_text("1", timeout=10000)  # one job waits on it
        celery.control.revoke(waiting)
        assert not page.errors  # type: ignore[attr-defined]


async def test_dashboard_offers_a_stored_result_as_a_download(
    browser: Browser, settings: Settings, worker: object
) -> None:
    async with run_server(settings) as srv:
        page = await open_dashboard(browser, srv.url)
        job_id = srv.services.celery.send_task("generate_report", kwargs={"pages": 3}).id
        link = row(page, job_id).locator("a.download")
        await expect(link).to_have_text(
            re.compile(r"^Download report\.pdf \(\d+(\.\d)? KB\)$"), timeout=15000
        )
        async with page.expect_download() as info:
            await link.click()
        download = await info.value
        assert download.suggested_filename == "report.pdf"
        assert Path(await download.path()).read_bytes().startswith(b"%PDF")


async def test_dashboard_recovers_when_redis_loses_everything(
    browser: Browser, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis, keeping nothing on disk, is killed mid-job and restarted empty: the page is
    told the job's history began again (a new epoch) and still ends on SUCCESS."""
    worker = Worker(own_redis.url, tmp_path / "w.log", concurrency=1, hostname="browser-epochs@%h")
    worker.start()
    try:
        async with run_server(settings_for(own_redis.url, heartbeat_interval=1.0)) as srv:
            page = await open_dashboard(browser, srv.url)
            job_id = srv.services.celery.send_task("report_steps", kwargs={"steps": 10, "delay": 0.4}).id
            job = row(page, job_id)
            # Late in the job, so the new history (seq 1..4) is shorter than the old one: a
            # client that kept the old seqs would drop every new event, SUCCESS included.
            store = redis.Redis.from_url(own_redis.url)
            key = srv.services.settings.keys.job(job_id)

            def step() -> int:
                progress = store.hget(key, "progress")
                return int(json.loads(progress).get("step", 0)) if progress else 0

            await wait_until(lambda: step() >= 7, what="step 7 of 10")
            store.close()
            await expect(job.locator(".state")).to_have_text("WORKING")
            own_redis.stop()  # SIGKILL: everything is gone
            own_redis.start()
            await expect(job.locator(".state")).to_have_text("SUCCESS", timeout=40000)
            assert not page.errors  # type: ignore[attr-defined]
    finally:
        worker.stop()


async def _expiring_sse_client(browser: Browser, srv: RunningServer, job_id: str, *, fixed: bool) -> Page:
    """A page whose browser client follows `job_id` over SSE with tokens that live 2 s:
    a token function (`window.asked` counts its calls), or one fixed token."""
    page = await browser.new_page()
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))  # type: ignore[attr-defined]
    page.errors = []  # type: ignore[attr-defined]
    # Whole seconds: `exp` is an integer, so a token lives 1-2 s.
    await page.expose_function("mintToken", lambda: token("acme", "alice", exp=int(time.time()) + 2))
    await page.goto(f"{srv.url}/healthz")
    await page.evaluate(
        """async ([jobId, fixed]) => {
          const { JobwireClient } = await import("/jobwire.js");
          window.asked = 0;
          window.events = [];
          window.errors = [];
          const ask = async () => { window.asked += 1; return await window.mintToken(); };
          window.client = new JobwireClient({
            transports: ["sse"],
            token: fixed ? await ask() : ask,
            onEvent: (e) => window.events.push(e),
            onError: (e) => window.errors.push({ ...e, asked: window.asked }),
          });
          window.client.subscribe([jobId]);
        }""",
        [job_id, fixed],
    )
    return page


def _expiry_settings(redis_url: str) -> Settings:
    return settings_for(redis_url, auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE)


def _expiring_job(redis_url: str) -> tuple[Settings, Recorder, str]:
    """JWT settings, a recorder, and a PENDING job of tenant acme's."""
    settings = _expiry_settings(redis_url)
    recorder = Recorder(redis.Redis.from_url(redis_url), settings)
    job_id = f"expiring-{uuid.uuid4()}"
    recorder.record(job_id, "PENDING", owner=Owner("acme", "alice"))
    return settings, recorder, job_id


async def test_sse_client_gets_a_new_token_at_expiry_and_resumes(
    browser: Browser, own_redis: RedisServer
) -> None:
    """On SSE, a token that expires mid-job ends the stream with `unauthenticated`; the
    browser client asks its token function for a new one and resumes from its last seq:
    every event arrives, once, in order."""
    settings, recorder, job_id = _expiring_job(own_redis.url)
    async with run_server(settings) as srv:
        page = await _expiring_sse_client(browser, srv, job_id, fixed=False)
        await wait_until(lambda: page.evaluate("window.events.length === 1"), what="PENDING arrives")
        recorder.record(job_id, "WORKING", progress={"step": 1})
        await wait_until(lambda: page.evaluate("window.events.length === 2"), what="step 1 arrives")
        # The token expires; the stream says so, and the client asks for another.
        await wait_until(lambda: page.evaluate("window.errors.length > 0"), what="the expiry", timeout=10)
        await wait_until(
            lambda: page.evaluate("window.asked > window.errors[0].asked"), what="a new token after it"
        )
        for step in (2, 3):
            recorder.record(job_id, "WORKING", progress={"step": step})
        recorder.record(job_id, "SUCCESS", result="done")
        await wait_until(lambda: page.evaluate("window.events.some((e) => e.final)"), what="SUCCESS arrives")
        events = await page.evaluate("window.events")
        told = await page.evaluate("window.errors")
        await page.evaluate("window.client.close()")
    assert_gap_free(events)  # progress sent together may come coalesced
    assert transitions(events) == ["PENDING", "WORKING", "SUCCESS"] and events[-1]["seq"] == 5
    assert (told[0]["code"], told[0]["message"]) == ("unauthenticated", "token expired")
    assert not page.errors  # type: ignore[attr-defined]


async def test_sse_client_with_a_fixed_token_stops_at_expiry(
    browser: Browser, own_redis: RedisServer
) -> None:
    """A fixed token will not become valid again: at its expiry the client says why and
    closes, rather than reconnecting with it (401 after 401, then down to polling)."""
    settings, recorder, job_id = _expiring_job(own_redis.url)
    async with run_server(settings) as srv:
        page = await _expiring_sse_client(browser, srv, job_id, fixed=True)
        await wait_until(lambda: page.evaluate("window.events.length === 1"), what="PENDING arrives")
        closed = "window.client.status === 'closed'"
        await wait_until(lambda: page.evaluate(closed), what="it stops", timeout=10)
        told = await page.evaluate("window.errors")
        transport = await page.evaluate("window.client.transport")
    assert [(e["code"], e["message"]) for e in told] == [("unauthenticated", "token expired")]
    assert transport == "sse"
    assert not page.errors  # type: ignore[attr-defined]


async def test_dashboard_retries_a_listing_refused_for_load(browser: Browser, own_redis: RedisServer) -> None:
    """Reads answered 429 with `Retry-After` (as a proxy or an overloaded server may) are
    tried again, not before it, and the listing still shows the job."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    job_id = f"listed-{uuid.uuid4()}"
    recorder.record(job_id, "PENDING", task="long_running_task")
    loop = asyncio.get_running_loop()
    asked: list[float] = []

    async def refuse_for_a_second(route: Route) -> None:
        asked.append(loop.time())
        if asked[-1] - asked[0] < 1.0:
            body = '{"error": {"code": "too_many_connections", "message": "later"}}'
            headers = {"Retry-After": "1"}
            await route.fulfill(status=429, headers=headers, content_type="application/json", body=body)
        else:
            await route.continue_()

    async with run_server(settings) as srv:
        page = await browser.new_page()
        await page.route("**/api/v1/jobs?limit=50", refuse_for_a_second)
        await page.goto(srv.url)
        await expect(row(page, job_id)).to_have_count(1, timeout=10000)
        # The wait it takes: never sooner than Retry-After (1-1.5 times it), else the backoff.
        waits = await page.evaluate(
            """async () => {
              const { notBefore } = await import("/jobwire.js");
              const later = Array.from({ length: 200 }, () => notBefore("2", 300));
              return [Math.min(...later), Math.max(...later), notBefore(null, 300), notBefore("1", 5000)];
            }"""
        )
    assert any(t - asked[0] < 1.0 for t in asked) and any(t - asked[0] >= 1.0 for t in asked)
    low, high, without, longer = waits
    assert 2000 <= low and high <= 3000 and without == 300 and longer == 5000
