"""`<jobwire-progress>` (js/jobwire-progress.js) in a real Chromium against a real server
and the session's worker, and its time-remaining rules run in Node."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, WebSocket, expect

import tests.test_browser  # noqa: F401 - importing it applies its never-skip-silently rule
from jobwire.settings import Settings
from tests.support import RunningServer, another_site, run_server, wait_until
from tests.test_auth import AUDIENCE, SECRET, submit_as, token

pytestmark = pytest.mark.browser

ELEMENT = Path(__file__).resolve().parent.parent / "js" / "jobwire-progress.js"

# The test page: it loads the element from `src` and records, after each event, what the
# bar shows (the element renders before it fires `jobwire-progress`).


PAGE = """<!doctype html><meta charset="utf-8"><title>bars</title>
<script type="module" src="%(src)s"></script>
<script>
  window.seen = [];
  window.finals = [];
  const part = (bar, name) => bar.shadowRoot.querySelector(`[part~="${name}"]`);
  document.addEventListener("jobwire-progress", (e) => {
    const bar = e.target;
    const estimate = part(bar, "estimate");
    seen.push({
      job: e.detail.job_id, seq: e.detail.seq, ts: e.detail.ts, state: e.detail.state,
      shown: part(bar, "state").textContent, description: part(bar, "description").textContent,
      detail: part(bar, "detail").textContent, estimate: estimate.hidden ? null : estimate.textContent,
      remaining: bar.remaining, now: part(bar, "bar").getAttribute("aria-valuenow"),
      live: bar.shadowRoot.querySelector('[role="status"]').textContent, result: e.detail.result,
    });
  });
  document.addEventListener("jobwire-final", (e) => finals.push(e.detail.job_id));
  window.addBar = (job, attrs = {}) => {
    const bar = document.createElement("jobwire-progress");
    for (const [name, value] of Object.entries(attrs)) bar.setAttribute(name, value);
    bar.setAttribute("job", job);
    document.body.append(bar);
  };
</script>
<body></body>"""


async def open_page(browser: Browser, page_url: str, src: str) -> Page:
    """The test page at `page_url`, a real address (Chromium keeps a page it did not load
    from a local address off local websockets), loading the element from `src`."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(page_url)
    await page.set_content(PAGE % {"src": src})  # the same document, origin and address
    await page.wait_for_function("customElements.get('jobwire-progress') !== undefined")
    return page


async def own_page(browser: Browser, srv: RunningServer) -> Page:
    """A page of the server's own origin (its health check's address, rewritten)."""
    return await open_page(browser, f"{srv.url}/healthz", "/jobwire-progress.js")


def bar(page: Page, job_id: str, part: str):  # type: ignore[no-untyped-def]
    return page.locator(f'jobwire-progress[job="{job_id}"] [part~="{part}"]')


async def seen(page: Page, job_id: str) -> list[dict[str, Any]]:
    return [s for s in await page.evaluate("window.seen") if s["job"] == job_id]


def send(srv: RunningServer, task: str, **kwargs: Any) -> str:
    return str(srv.services.celery.send_task(task, kwargs=kwargs).id)


async def test_bar_follows_a_job_to_success_accessibly(
    browser: Browser,
    server: RunningServer,
) -> None:
    """State, percent, description and ARIA follow the job to SUCCESS; the live region
    speaks at each change of state, not at each percent."""
    page = await own_page(browser, server)
    job_id = send(server, "report_steps", steps=6, delay=0.3)
    await page.evaluate("id => addBar(id, {label: 'Nightly export'})", job_id)
    progressbar = bar(page, job_id, "bar")
    await expect(bar(page, job_id, "state")).to_have_text("SUCCESS", timeout=15000)
    await expect(progressbar).to_have_attribute("role", "progressbar")
    await expect(progressbar).to_have_attribute("aria-valuenow", "100")
    await expect(progressbar).to_have_attribute("aria-valuemin", "0")
    await expect(progressbar).to_have_attribute("aria-valuemax", "100")
    await expect(progressbar).to_have_attribute("aria-label", "Nightly export")
    await expect(progressbar).to_have_attribute("aria-valuetext", "100%, SUCCESS, Done")
    await expect(bar(page, job_id, "percent")).to_have_text("100%")
    await expect(page.locator(f'jobwire-progress[job="{job_id}"]')).to_have_attribute("state", "SUCCESS")
    shots = await seen(page, job_id)
    # (a replay of the job's start may coalesce its first progress events: transitions stay)
    assert list(dict.fromkeys(s["state"] for s in shots)) == ["PENDING", "STARTED", "WORKING", "SUCCESS"]
    assert shots[0]["now"] is None  # PENDING: indeterminate, no aria-valuenow
    working = [s for s in shots if s["state"] == "WORKING"]
    assert len(working) >= 4
    assert [s["now"] for s in working][-3:] == ["50", "66.67", "83.33"]
    assert working[-1]["description"] == "Step 6 of 6 (6/6)"
    assert working[-1]["remaining"] is None  # 1.5 s of samples: too soon for an estimate
    spoken = [s["live"] for s in shots]
    assert list(dict.fromkeys(spoken)) == ["Now PENDING", "Now STARTED", "Now WORKING", "Finished: SUCCESS"]
    assert await page.evaluate("finals") == [job_id]
    assert page.errors == []  # type: ignore[attr-defined]


async def test_estimate_shows_only_after_steady_progress_and_says_so(
    browser: Browser,
    server: RunningServer,
) -> None:
    """24 steps of 0.25 s: no estimate for the first seconds, then one labelled an estimate,
    close to the time the job really had left; none once it ended."""
    page = await own_page(browser, server)
    job_id = send(server, "report_steps", steps=24, delay=0.25)
    await page.evaluate("id => addBar(id)", job_id)
    await expect(bar(page, job_id, "state")).to_have_text("SUCCESS", timeout=20000)
    await expect(bar(page, job_id, "estimate")).to_be_hidden()
    shots = await seen(page, job_id)
    working = [s for s in shots if s["state"] == "WORKING"]
    first = working[0]["ts"]
    estimated = [s for s in working if s["estimate"] is not None]
    assert estimated, "no estimate during 6 s of steady progress"
    for shot in estimated:
        assert re.fullmatch(r"(about \d+ (s|min)|a few seconds) left \(estimate\)", shot["estimate"])
        assert shot["ts"] - first >= 3.0 - 0.05, "an estimate before 3 s of samples"
    assert all(s["estimate"] is None for s in shots if s["state"] != "WORKING")
    end = shots[-1]["ts"]
    for shot in estimated:  # the job's real time left, by the worker's clock
        assert abs(shot["remaining"] - (end - shot["ts"])) < 1.5, shot
    assert page.errors == []  # type: ignore[attr-defined]


async def test_failing_task_shows_its_error(
    browser: Browser,
    server: RunningServer,
) -> None:
    page = await own_page(browser, server)
    job_id = send(server, "failing_task", delay=0.1)
    await page.evaluate("id => addBar(id)", job_id)
    message = "ValueError: Simulated failure: the input file is corrupt at row 42"
    await expect(bar(page, job_id, "state")).to_have_text("FAILURE", timeout=15000)
    await expect(bar(page, job_id, "detail")).to_have_text(message)
    shots = await seen(page, job_id)
    assert shots[-1]["live"] == f"Failed: {message}"
    assert shots[-1]["now"] == "0"  # the bar stays where the job stopped
    assert await page.evaluate("finals") == [job_id]


async def test_retrying_task_shows_the_retry_then_success(
    browser: Browser,
    server: RunningServer,
) -> None:
    page = await own_page(browser, server)
    job_id = send(server, "retrying_task", delay=0.5, failures=1)
    await page.evaluate("id => addBar(id)", job_id)
    await expect(bar(page, job_id, "state")).to_have_text("SUCCESS", timeout=15000)
    retry = [s for s in await seen(page, job_id) if s["state"] == "RETRY"]
    assert len(retry) == 1
    assert re.fullmatch(
        r"Retry 1 (at \S.*|in [\d.]+ s) after ConnectionError: Upstream service unavailable",
        retry[0]["detail"],
    ), retry[0]["detail"]
    assert retry[0]["live"] == retry[0]["detail"]
    assert retry[0]["now"] is None  # nothing known of the next attempt's progress yet


async def test_revoked_job_shows_revoked(
    browser: Browser,
    server: RunningServer,
) -> None:
    page = await own_page(browser, server)
    job_id = send(server, "report_steps", steps=100, delay=0.2)
    await page.evaluate("id => addBar(id)", job_id)
    await expect(bar(page, job_id, "state")).to_have_text("WORKING", timeout=15000)
    resp = await page.request.delete(f"{server.url}/api/v1/jobs/{job_id}")
    assert resp.ok, await resp.text()
    await expect(bar(page, job_id, "state")).to_have_text("REVOKED", timeout=15000)
    await expect(bar(page, job_id, "detail")).to_contain_text("TaskRevokedError")
    assert (await seen(page, job_id))[-1]["live"] == "Cancelled: REVOKED"
    assert await page.evaluate("finals") == [job_id]


async def test_group_shows_its_children_done_of_total(
    browser: Browser,
    server: RunningServer,
) -> None:
    page = await own_page(browser, server)
    body = {"group": [{"task": "plain_sum", "args": [[i]], "kwargs": {"delay": 0.2}} for i in range(4)]}
    resp = await page.request.post(f"{server.url}/api/v1/jobs", data=body)
    assert resp.status == 202
    group_id = (await resp.json())["job_id"]
    await page.evaluate("id => addBar(id)", group_id)
    await expect(bar(page, group_id, "state")).to_have_text("SUCCESS", timeout=15000)
    await expect(bar(page, group_id, "description")).to_have_text("4 of 4 done")
    running = [s for s in await seen(page, group_id) if s["state"] == "RUNNING"]
    assert running and all(re.fullmatch(r"[0-4] of 4 done", s["description"]) for s in running)


def said(sent: list[dict[str, Any]], op: str, job_id: str) -> bool:
    return any(m.get("op") == op and job_id in m.get("job_ids", []) for m in sent)


async def test_bars_share_one_websocket_and_let_go_of_it(
    browser: Browser,
    server: RunningServer,
) -> None:
    """Two bars, one socket; a removed bar unsubscribes, a changed `job` switches jobs, the
    socket closes when no bar is left, and a new bar opens a new one."""
    page = await own_page(browser, server)
    sockets: list[WebSocket] = []
    sent: list[dict[str, Any]] = []

    def opened(ws: WebSocket) -> None:
        sockets.append(ws)
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

    page.on("websocket", opened)
    one, two, three = (send(server, "report_steps", steps=2, delay=0.1) for _ in range(3))
    await page.evaluate("([a, b]) => { addBar(a); addBar(b); }", [one, two])
    for job_id in (one, two):
        await expect(bar(page, job_id, "state")).to_have_text("SUCCESS", timeout=15000)
    assert len(sockets) == 1

    await page.evaluate("id => document.querySelector(`jobwire-progress[job='${id}']`).remove()", one)
    await wait_until(lambda: said(sent, "unsubscribe", one), what="the removed bar unsubscribes")
    await page.evaluate(
        "([a, b]) => document.querySelector(`jobwire-progress[job='${a}']`).job = b", [two, three]
    )
    await expect(bar(page, three, "state")).to_have_text("SUCCESS", timeout=15000)
    assert said(sent, "unsubscribe", two) and said(sent, "subscribe", three)
    assert len(sockets) == 1

    await page.evaluate("document.querySelector('jobwire-progress').remove()")
    await wait_until(sockets[0].is_closed, what="the last bar's removal closes the socket")
    await page.evaluate("id => addBar(id)", one)
    await expect(bar(page, one, "state")).to_have_text("SUCCESS", timeout=15000)
    assert len(sockets) == 2
    assert page.errors == []  # type: ignore[attr-defined]


async def test_with_auth_a_page_on_another_origin_offers_the_stored_result(
    browser: Browser,
    settings: Settings,
    worker: object,
) -> None:
    """A page on another origin loads the element from the server and needs nothing else:
    the bar talks to the server it came from, with a token function, and offers the stored
    result as a link that works (the token in its address). Another tenant's job, under the
    `token` attribute, reads "Not found"."""
    with another_site() as page_origin:
        secured = settings.model_copy(
            update=dict(auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE, allowed_origins=(page_origin,))
        )
        async with run_server(secured) as srv:
            await _offers_the_stored_result(browser, srv, f"{page_origin}/orders")


async def _offers_the_stored_result(browser: Browser, srv: RunningServer, page_url: str) -> None:
    user = token("acme", f"bar-{uuid.uuid4()}")
    job_id = await submit_as(srv, user, task="generate_report", pages=3)
    theirs = await submit_as(srv, token("globex", "bob"), delay=0.01)
    page = await open_page(browser, page_url, f"{srv.url}/jobwire-progress.js")
    # One bar's token is a function (the `token` property), the other's the attribute.
    await page.evaluate(
        """([a, b, t]) => {
            const mine = document.createElement("jobwire-progress");
            mine.token = async () => t;
            mine.job = a;
            document.body.append(mine);
            addBar(b, {token: t});
        }""",
        [job_id, theirs, user],
    )
    link = bar(page, job_id, "download")
    await expect(link).to_have_text(re.compile(r"^Download report\.pdf \(\d+(\.\d)? KB\)$"), timeout=20000)
    href = await link.get_attribute("href")
    assert href == f"{srv.url}/api/v1/jobs/{job_id}/result?token={user}"
    resp = await page.request.get(href)
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/pdf"
    stored = (await seen(page, job_id))[-1]["result"]
    assert hashlib.sha256(await resp.body()).hexdigest() == stored["sha256"]
    await expect(bar(page, theirs, "state")).to_have_text("Not found", timeout=10000)
    assert page.errors == []  # type: ignore[attr-defined]


async def test_a_page_shares_its_own_client_and_keeps_its_callbacks(
    browser: Browser, server: RunningServer
) -> None:
    """Bars given the page's JobwireClient (the `client` property) use its one socket; the
    page's own onEvent still sees every event; removing the bars leaves the client open."""
    page = await own_page(browser, server)
    sockets: list[WebSocket] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    one, two = (send(server, "report_steps", steps=2, delay=0.1) for _ in range(2))
    await page.evaluate(
        """async ([a, b]) => {
            const { JobwireClient } = await import("/jobwire.js");
            window.pageEvents = [];
            window.pageClient = new JobwireClient({ onEvent: (e) => pageEvents.push(e.state) });
            for (const id of [a, b]) {
                const bar = document.createElement("jobwire-progress");
                bar.client = pageClient;
                bar.job = id;
                document.body.append(bar);
            }
        }""",
        [one, two],
    )
    for job_id in (one, two):
        await expect(bar(page, job_id, "state")).to_have_text("SUCCESS", timeout=15000)
    assert await page.evaluate("pageEvents.filter((s) => s === 'SUCCESS').length") == 2
    assert len(sockets) == 1
    await page.evaluate("document.querySelectorAll('jobwire-progress').forEach((b) => b.remove())")
    assert await page.evaluate("new Promise((r) => setTimeout(() => r(pageClient.status), 200))") == "live"
    assert not sockets[0].is_closed()
    assert page.errors == []  # type: ignore[attr-defined]


# -- the estimate's rules, in Node ----------------------------------------------------------

NODE = shutil.which("node")


def steady(n: int, every: float = 500, step: float = 4) -> list[dict[str, float]]:
    return [{"t": i * every, "percent": i * step} for i in range(n)]


ESTIMATE_CASES = {
    # name: (samples, now, expected seconds or None)
    "steady": (steady(10), 4500, 8.0),  # 0 to 36% in 4.5 s is 8%/s: 64% left takes 8 s
    "steady, some time after the last sample": (steady(10), 5000, 7.5),
    "too few samples": (steady(4, every=2000), 6000, None),
    "too little time": (steady(12, every=200), 2200, None),
    "erratic": (
        [{"t": i * 500, "percent": p} for i, p in enumerate([0, 30, 31, 32, 33, 34, 64, 65, 66])],
        4000,
        None,
    ),
    "speeding up": (
        [{"t": i * 500, "percent": p} for i, p in enumerate([0, 1, 2, 3, 4, 10, 20, 30, 40])],
        4000,
        None,
    ),
    "stalled": (steady(10), 4500 + 3001, None),
    "backwards": (steady(6) + [{"t": 3000, "percent": 1}] + steady(10)[7:], 4500, None),
    "no progress": ([{"t": i * 500, "percent": 10} for i in range(10)], 4500, None),
    "done": ([{"t": i * 500, "percent": min(100, i * 20)} for i in range(10)], 4500, None),
}


def run_node(script: str) -> Any:
    if NODE is None:
        pytest.fail("the element's rules are tested in Node: install nodejs (`apt-get install nodejs`)")
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_estimate_rules_in_node() -> None:
    """Steady progress gets a number; too few samples, too short a span, an erratic or
    changing rate, a stall, progress going backwards, none at all, or done get none."""
    cases = {name: [samples, now] for name, (samples, now, _) in ESTIMATE_CASES.items()}
    got = run_node(
        f"import {{ estimateRemaining }} from {json.dumps(ELEMENT.as_uri())};\n"
        f"const cases = {json.dumps(cases)};\n"
        "const out = {};\n"
        "for (const [name, [samples, now]] of Object.entries(cases)) {\n"
        "  out[name] = estimateRemaining(samples, now);\n"
        "}\n"
        "console.log(JSON.stringify(out));"
    )
    for name, (_, _, expected) in ESTIMATE_CASES.items():
        if expected is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(expected), name


def test_samples_and_wording_in_node() -> None:
    """A burst is one sample (they span time, not events); going backwards starts again;
    every shown estimate says it is one."""
    got = run_node(
        f"import {{ addSample, describeRemaining }} from {json.dumps(ELEMENT.as_uri())};\n"
        "let s = [];\n"
        "const burst = [[0, 0], [10, 1], [20, 2], [30, 3], [500, 4], [510, 5]];\n"
        "for (const [t, percent] of burst) s = addSample(s, {t, percent});\n"
        "const back = addSample(s, {t: 600, percent: 1});\n"
        "let many = [];\n"
        "for (let i = 0; i < 200; i++) many = addSample(many, {t: i * 1000, percent: i / 2});\n"
        "const words = [null, 3, 42, 119, 150, 3600, 7330].map(describeRemaining);\n"
        "console.log(JSON.stringify({s, back, many: many.length, words}));"
    )
    assert got["s"] == [{"t": 0, "percent": 0}, {"t": 500, "percent": 4}, {"t": 510, "percent": 5}]
    assert got["back"] == [{"t": 600, "percent": 1}]
    assert got["many"] == 60
    assert got["words"] == [
        "",
        "a few seconds left (estimate)",
        "about 40 s left (estimate)",
        "about 2 min left (estimate)",
        "about 3 min left (estimate)",
        "about 1 h left (estimate)",
        "about 2 h 2 min left (estimate)",
    ]
