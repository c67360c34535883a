"""The page on one origin, jobwire on another: what an adopter met first, in Chromium.

Without `JOBWIRE_ALLOWED_ORIGINS` the browser can reach nothing (the upgrade is refused 403,
SSE and polls are blocked by CORS): the client must say so through `onError` (it used to
say nothing), and the server's log must say why, naming the origin. With the origin
allowed, the page loads the client from jobwire itself (a module script, so CORS) and
follows a job live over a websocket.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
from playwright.async_api import Browser

from jobwire.settings import Settings
from tests.clients import submit
from tests.support import another_site, run_server
from tests.test_browser import CHROMIUM  # noqa: F401  (importing it applies the never-skip rule; the fixture: conftest)

pytestmark = pytest.mark.browser

CLIENT = Path(__file__).resolve().parent.parent / "js" / "jobwire.js"


def shop() -> contextlib.AbstractContextManager[str]:
    """The adopter's own site on another port, with a copy of the client at `/jobwire.js`
    (as a bundler would serve it)."""
    return another_site({"/jobwire.js": CLIENT.read_bytes()})


FOLLOW = """async ([module, baseUrl, jobId]) => {
    const { JobwireClient } = await import(module);
    window.seen = { errors: [], events: [], statuses: [] };
    window.client = new JobwireClient({
        baseUrl,
        failuresBeforeFallback: 1,
        onError: (e) => window.seen.errors.push(e),
        onEvent: (e) => window.seen.events.push(e),
        onStatus: (s) => window.seen.statuses.push(s),
    });
    window.client.subscribe([jobId]);
}"""


async def test_a_refused_origin_is_said_on_both_sides(
    browser: Browser,  # noqa: F811
    settings: Settings,
    worker: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jobwire.server.refusals")
    with shop() as origin:
        async with run_server(settings) as srv:
            job_id = await submit(srv.url, delay=0.05)
            page = await browser.new_page()
            await page.goto(f"{origin}/")
            await page.evaluate(FOLLOW, [f"{origin}/jobwire.js", srv.url, job_id])
            await page.wait_for_function("window.seen.errors.length > 0", timeout=20000)
            [error] = await page.evaluate("window.seen.errors")
            assert error["code"] == "unreachable", error
            assert srv.url in error["message"] and "JOBWIRE_ALLOWED_ORIGINS" in error["message"]
            assert await page.evaluate("window.seen.events") == []
            await page.evaluate("window.client.close()")
            await page.close()
    said = [r.getMessage() for r in caplog.records if r.name == "jobwire.server.refusals"]
    assert any(origin in line and "JOBWIRE_ALLOWED_ORIGINS" in line for line in said), said


async def test_an_allowed_origin_loads_the_client_from_jobwire_and_goes_live(
    browser: Browser,  # noqa: F811
    settings: Settings,
    worker: object,
) -> None:
    with shop() as origin:
        allowed = settings.model_copy(update={"allowed_origins": (origin,)})
        async with run_server(allowed) as srv:
            job_id = await submit(srv.url, delay=0.05)
            page = await browser.new_page()
            await page.goto(f"{origin}/")
            await page.evaluate(FOLLOW, [f"{srv.url}/jobwire.js", srv.url, job_id])
            await page.wait_for_function("window.seen.events.some((e) => e.final)", timeout=20000)
            seen = await page.evaluate("window.seen")
            assert seen["errors"] == [] and seen["events"][-1]["state"] == "SUCCESS"
            assert {"status": "live", "transport": "websocket"} in seen["statuses"]
            await page.evaluate("window.client.close()")
            await page.close()
