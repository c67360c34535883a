"""celery-progress compatibility: its answers, its websocket, and its own JS in Chromium.

The oracle is celery-progress itself: its `Progress.get_info` (fed Celery's own result
objects) for each state's shape, and its `celery_progress.js` / `websockets.js`, loaded
from the installed package, driving a bar against jobwire with nothing changed but the URL.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import websockets
from celery.exceptions import TaskRevokedError
from celery_progress.backend import KnownResult, Progress, ProgressRecorder
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus

from jobwire.protocol import progress_from_meta, progress_meta
from jobwire.server import celery_progress as answers
from jobwire.tasks.recorder import Owner, Recorder
from tests.clients import submit
from tests.support import RunningServer, wait_until
from tests.test_auth import A, B, auth_settings, srv, submit_as, token  # noqa: F401

# -- the translation, against celery-progress's own get_info ------------------------------


def celery_progress_says(state: str, value: Any = None, traceback: str | None = None) -> dict[str, Any]:
    """What celery-progress answers for a task whose result backend holds `value` in `state`."""
    return Progress(KnownResult("t", value, state, traceback)).get_info()  # type: ignore[no-any-return]


RETRY_TRACEBACK = "Traceback (most recent call last):\ncelery.exceptions.Retry: Retry in {}s: {}"
LONG_REASON = "Upstream service unavailable: connection refused by 10.0.0.7 after 3 tries"

SAME_AS_CELERY_PROGRESS = [
    ({"state": "PENDING", "progress": None}, ("PENDING",)),
    ({"state": "STARTED", "progress": None}, ("STARTED",)),
    (
        {"state": "SUCCESS", "result": {"status": "done", "steps": 3}},
        ("SUCCESS", {"status": "done", "steps": 3}),
    ),
    ({"state": "SUCCESS", "result": "sent"}, ("SUCCESS", "sent")),
    ({"state": "SUCCESS"}, ("SUCCESS", None)),
    (
        {"state": "FAILURE", "error": {"type": "ValueError", "message": "corrupt at row 42"}},
        ("FAILURE", ValueError("corrupt at row 42")),
    ),
    (
        {
            "state": "RETRY",
            "error": {"type": "ConnectionError", "message": LONG_REASON},
            "retry": {"attempt": 1, "countdown": 4.998, "eta": "2030-01-01T00:00:05+00:00"},
        },
        (
            "RETRY",
            ConnectionError(LONG_REASON),
            RETRY_TRACEBACK.format(5, repr(ConnectionError(LONG_REASON))),
        ),
    ),
    (  # a retry that named no countdown
        {
            "state": "RETRY",
            "error": {"type": "ConnectionError", "message": "down"},
            "retry": {"countdown": None},
        },
        ("RETRY", ConnectionError("down"), "Traceback (most recent call last):\nRetry: Retry at 12:00"),
    ),
    (
        {"state": "REVOKED", "error": {"type": "TaskRevokedError", "message": "revoked"}},
        ("REVOKED", TaskRevokedError("revoked")),
    ),
    ({"state": "IGNORED", "progress": {"value": "nothing to do"}}, ("IGNORED", "nothing to do")),
]


@pytest.mark.parametrize(("event", "backend"), SAME_AS_CELERY_PROGRESS)
def test_each_state_answers_as_celery_progress_does(event: dict[str, Any], backend: tuple[Any, ...]) -> None:
    """PENDING, STARTED, SUCCESS, FAILURE (the exception as its message), RETRY (countdown
    and cut reason), REVOKED and IGNORED: key for key what celery-progress answers."""
    assert answers.from_event(event) == celery_progress_says(*backend)


def test_an_unknown_id_answers_as_celery_progress_answers_one() -> None:
    """Celery calls every id it has not heard of PENDING, and so does celery-progress."""
    assert answers.unknown() == answers.from_snapshot(None) == celery_progress_says("PENDING")


class _Task:
    """Where celery-progress's own ProgressRecorder writes (its `update_state`)."""

    def update_state(self, state: str, meta: Any) -> None:
        self.state, self.meta = state, meta


@given(
    total=st.integers(min_value=0, max_value=10**9),
    done=st.integers(min_value=0, max_value=10**9),
    description=st.text(max_size=40),
)
def test_celery_progress_recorder_progress_comes_back_as_it_went_in(
    total: int, done: int, description: str
) -> None:
    """A task reporting with celery-progress's own ProgressRecorder, on an attached app:
    jobwire's event for that `update_state` answers what celery-progress answers."""
    task = _Task()
    state, meta = ProgressRecorder(task).set_progress(min(done, total), total, description)
    event = {"state": state, "progress": progress_from_meta(task.meta)}
    assert answers.from_event(event) == celery_progress_says(state, meta)


@given(
    state=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=20).filter(
        lambda s: s not in {"PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "IGNORED"}
    ),
    total=st.integers(min_value=1, max_value=10**6),
    step=st.integers(min_value=0, max_value=10**6),
    percent=st.none() | st.floats(min_value=0, max_value=100),
    description=st.none() | st.text(max_size=40),
)
def test_custom_states_are_progress_not_unknown_state(
    state: str, total: int, step: int, percent: float | None, description: str | None
) -> None:
    """Any custom state with jobwire's progress (`step`/`total`, maybe an honest `percent`)
    is a task on its way, with its counts, its percent and its description, where
    celery-progress would end it as "Unknown state"."""
    step = min(step, total)
    progress = progress_meta(step, total, description, percent)
    got = answers.from_event({"state": state, "progress": progress, "final": False})
    assert got["state"] == state
    assert (got["complete"], got["success"], "result" in got) == (False, None, False)
    assert got["progress"] == {
        **progress,
        "pending": False,
        "current": step,
        "total": total,
        "percent": progress["percent"],
        "description": description or "",
    }
    assert 0 <= got["progress"]["percent"] <= 100
    assert celery_progress_says(state, progress)["result"] == f"Unknown state {state}"


@pytest.mark.parametrize(
    ("progress", "shown"),
    [
        ({"current": 3, "total": 4, "description": "rows"}, (3, 4, 75.0, "rows")),
        ({"step": 2, "total": 3}, (2, 3, 66.67, "")),
        ({"step": 1, "total": 5, "percent": 0.0, "description": "Step 1 of 5"}, (1, 5, 0.0, "Step 1 of 5")),
        ({"done": 3, "failed": 1, "total": 10, "percent": 40}, (3, 10, 40, "")),  # a group's RUNNING
        ({"percent": 40.5, "description": "almost"}, (40.5, 100, 40.5, "almost")),
        ({"current": 7}, (7, 0, 0, "")),  # celery-progress's recorder without a total
        ({"description": "thinking"}, (0, 100, 0, "thinking")),
        (None, (0, 100, 0, "")),
        ({"value": [1, 2]}, (0, 100, 0, "")),  # a meta that was not a dict
        ({"current": True, "total": float("nan"), "percent": "x"}, (0, 100, 0, "")),  # nonsense
    ],
)
def test_custom_progress_counts_in_either_convention(progress: Any, shown: tuple[Any, ...]) -> None:
    got = answers.custom_progress(progress)
    assert (got["current"], got["total"], got["percent"], got["description"]) == shown
    assert got["pending"] is False


# -- HTTP ----------------------------------------------------------------------------------


async def poll(
    http: httpx.AsyncClient, path: str, *, until: str = "complete", timeout: float = 20
) -> list[Any]:
    """celery-progress's poll, faster: every distinct answer until one is complete (or in `until`)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await http.get(path)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        if not seen or seen[-1] != body:
            seen.append(body)
        if body["state"] == until or (until == "complete" and body["complete"] and body["state"] != "RETRY"):
            return seen
        await asyncio.sleep(0.03)
    raise AssertionError(f"no {until} answer within {timeout}s; saw {seen}")


async def test_http_answers_follow_a_real_job_to_success(server: RunningServer) -> None:
    """Polled through a real worker's job: PENDING or STARTED, then each custom state as
    progress with its counts and description, then SUCCESS with the task's result. Never
    cached; the same with or without the trailing slash."""
    job = await submit(server.url, "long_running_task", delay=0.4)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        seen = await poll(http, f"/celery-progress/{job}/")
        custom = {a["state"]: a for a in seen if a["state"] not in ("PENDING", "STARTED", "SUCCESS")}
        assert list(custom) == ["VALIDATING", "PROCESSING", "UPLOADING"]
        assert custom["PROCESSING"] == {
            "state": "PROCESSING",
            "complete": False,
            "success": None,
            "progress": {
                "step": 2,
                "total": 3,
                "description": "Processing data",
                "percent": 66.67,
                "pending": False,
                "current": 2,
            },
        }
        final = {
            "state": "SUCCESS",
            "complete": True,
            "success": True,
            "progress": {"pending": False, "current": 100, "total": 100, "percent": 100},
            "result": {"status": "done", "steps": 3},
        }
        assert seen[-1] == final
        for path in (f"/celery-progress/{job}/", f"/celery-progress/{job}"):
            resp = await http.get(path)
            assert resp.json() == final
            assert "no-store" in resp.headers["cache-control"]


async def test_http_answers_a_failure_a_retry_and_a_revoke(server: RunningServer) -> None:
    """FAILURE: the exception's message. RETRY: complete but not over (celery-progress's JS
    keeps polling), with the countdown and the reason, then SUCCESS. REVOKED: "Task ..."."""
    failing = await submit(server.url, "failing_task", delay=0.1)
    retrying = await submit(server.url, "retrying_task", delay=1.0, failures=1)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        failed, retried = await asyncio.gather(
            poll(http, f"/celery-progress/{failing}/"), poll(http, f"/celery-progress/{retrying}/")
        )
        assert failed[-1] == {
            "state": "FAILURE",
            "complete": True,
            "success": False,
            "progress": {"pending": False, "current": 100, "total": 100, "percent": 100},
            "result": "Simulated failure: the input file is corrupt at row 42",
        }
        retry = [a for a in retried if a["state"] == "RETRY"]
        assert [(a["complete"], a["success"], a["result"]) for a in retry] == [
            (True, False, {"next_retry_seconds": 1, "message": "Upstream service unavailable..."})
        ]
        assert retried[-1]["state"] == "SUCCESS" and retried[-1]["result"] == {
            "status": "done",
            "attempts": 2,
        }

        revoked = await submit(server.url, "long_running_task", delay=5)
        await poll(http, f"/celery-progress/{revoked}/", until="VALIDATING")
        assert (await http.delete(f"/api/v1/jobs/{revoked}")).status_code == 202
        answer = (await poll(http, f"/celery-progress/{revoked}/"))[-1]
        assert (answer["state"], answer["success"], answer["result"]) == (
            "REVOKED",
            False,
            "Task revoked by request",
        )


async def test_http_unknown_and_bad_ids(server: RunningServer) -> None:
    """An unknown id is PENDING, as celery-progress answers it; a malformed one is a clear
    422, and another method a 405, both as JSON errors."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        odd_but_valid = ["no-such-job", "a%2Fb/", "..%2F..%2Fetc/", "%FF/", "%E2%80%AE%F0%9F%98%80/", "~x/"]
        for path in [f"/celery-progress/{uuid.uuid4()}/", *(f"/celery-progress/{i}" for i in odd_but_valid)]:
            resp = await http.get(path)
            assert resp.status_code == 200, (path, resp.text)
            assert resp.json() == celery_progress_says("PENDING")
        for bad in ("/celery-progress/%01bad/", "/celery-progress//", f"/celery-progress/{'x' * 1025}/"):
            resp = await http.get(bad)
            assert resp.status_code == 422, bad
            assert resp.json()["error"]["code"] == "invalid_job_id"
        resp = await http.post(f"/celery-progress/{uuid.uuid4()}/")
        assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


# -- the websocket -------------------------------------------------------------------------


async def socket_answers(url: str, **connect: Any) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Every message on the socket until the server closes it, sending first what
    celery-progress's websockets.js sends when it opens."""
    async with websockets.connect(url, **connect) as ws:
        messages = []
        try:
            await ws.send(json.dumps({"type": "check_task_completion"}))
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        except ConnectionClosed:
            pass
    return messages, ws.close_code, ws.close_reason


async def test_websocket_pushes_one_answer_per_event_then_closes(
    server: RunningServer, rclient: redis.Redis
) -> None:
    """The job's state when it connects, then one answer per event as each is recorded,
    each what the HTTP endpoint answers for it; through a RETRY (complete, not over) to the
    final event; then a normal close."""
    job = f"cp-scripted-{uuid.uuid4()}"
    recorder = Recorder(rclient, server.services.settings)
    recorder.record(job, "PENDING", task="probe")
    script: list[dict[str, Any]] = [
        {"state": "STARTED"},
        {"state": "PROGRESS", "progress": {"pending": False, "current": 1, "total": 4, "percent": 25.0}},
        {"state": "PROGRESS", "progress": {"pending": False, "current": 2, "total": 4, "percent": 50.0}},
        {"state": "RETRY", "error": {"type": "OSError", "message": "flaky"}, "retry": {"countdown": 2}},
        {"state": "STARTED"},
        {"state": "RESIZING", "progress": progress_meta(3, 4, "Resizing")},
        {"state": "SUCCESS", "result": [1, 2]},
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        async with websockets.connect(f"{server.ws_url}/celery-progress/{job}/") as ws:
            await ws.send(json.dumps({"type": "check_task_completion"}))
            got = [json.loads(await asyncio.wait_for(ws.recv(), 10))]
            assert got == [celery_progress_says("PENDING")]
            for step in script:
                fields = {k: v for k, v in step.items() if k != "state"}
                recorder.record(job, step["state"], **fields)
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                assert got[-1] == (await http.get(f"/celery-progress/{job}/")).json()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert (ws.close_code, ws.close_reason) == (1000, "job finished")
        history = (await http.get(f"/api/v1/jobs/{job}/history")).json()["events"]
    assert got == [answers.from_event(e) for e in history]
    assert [a["state"] for a in got] == ["PENDING", *(step["state"] for step in script)]
    assert got[4]["result"] == {"next_retry_seconds": 2, "message": "flaky..."}


async def test_websocket_follows_a_real_job_to_success(server: RunningServer) -> None:
    """A real worker's job, watched from just after it was submitted: every event from
    the one current at connect, in order, up to SUCCESS; then 1000."""
    job = await submit(server.url, "long_running_task", delay=0.3)
    got, code, reason = await socket_answers(f"{server.ws_url}/celery-progress/{job}/")
    assert (code, reason) == (1000, "job finished")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        history = (await http.get(f"/api/v1/jobs/{job}/history")).json()["events"]
    expected = [answers.from_event(e) for e in history]
    assert got == expected[-len(got) :]
    assert [a["state"] for a in got][-4:] == ["VALIDATING", "PROCESSING", "UPLOADING", "SUCCESS"]
    assert got[-1]["result"] == {"status": "done", "steps": 3}


async def test_websocket_for_a_finished_and_an_unknown_job(server: RunningServer) -> None:
    """A finished job: its final answer, then 1000. An unknown id: celery-progress's
    PENDING answer, then 4404 (its bar keeps "Waiting for task to start...")."""
    job = await submit(server.url, "plain_sum", numbers=[1, 2, 3])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await poll(http, f"/celery-progress/{job}/")
    got, code, _ = await socket_answers(f"{server.ws_url}/celery-progress/{job}")  # no trailing slash
    assert code == 1000
    assert [(a["state"], a["result"]) for a in got] == [("SUCCESS", 6.0)]
    got, code, reason = await socket_answers(f"{server.ws_url}/celery-progress/{uuid.uuid4()}/")
    assert got == [celery_progress_says("PENDING")]
    assert (code, reason) == (4404, "job not found")
    got, code, _ = await socket_answers(f"{server.ws_url}/celery-progress/%01bad/")
    assert (got, code) == ([], 4400)


# -- auth ----------------------------------------------------------------------------------


async def test_token_in_the_query_and_tenants(srv: RunningServer) -> None:  # noqa: F811
    """Auth on: no token is a 401; `?token=` works where celery-progress's JS sets no
    header; another tenant's job answers exactly as an unknown id, on HTTP and on the
    websocket; a page on another site cannot open the socket."""
    job = await submit_as(srv, A, "long_running_task", delay=0.2)
    ghost = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        resp = await http.get(f"/celery-progress/{job}/")
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"
        assert (await poll(http, f"/celery-progress/{job}/?token={A}"))[-1]["state"] == "SUCCESS"
        link = (await http.post(f"/api/v1/jobs/{job}/token", headers={"Authorization": f"Bearer {A}"})).json()
        resp = await http.get(f"/celery-progress/{job}?token={link['token']}")  # a page's single-job token
        assert resp.json()["state"] == "SUCCESS"
        foreign = await http.get(f"/celery-progress/{job}/?token={B}")
        unknown = await http.get(f"/celery-progress/{ghost}/?token={B}")
        assert foreign.status_code == unknown.status_code == 200
        assert foreign.content == unknown.content
        assert foreign.json() == celery_progress_says("PENDING")
    mine = await socket_answers(f"{srv.ws_url}/celery-progress/{job}/?token={A}")
    assert [a["state"] for a in mine[0]] == ["SUCCESS"] and mine[1] == 1000
    theirs = await socket_answers(f"{srv.ws_url}/celery-progress/{job}/?token={B}")
    nobody = await socket_answers(f"{srv.ws_url}/celery-progress/{ghost}/?token={B}")
    assert theirs == nobody == ([celery_progress_says("PENDING")], 4404, "job not found")
    anonymous = await socket_answers(f"{srv.ws_url}/celery-progress/{job}/")
    assert anonymous[:2] == ([], 4401)  # its first message was no {"op": "auth"}
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            f"{srv.ws_url}/celery-progress/{job}/?token={A}", origin="http://evil.example"
        )
    assert refused.value.response.status_code == 403


async def test_websocket_closes_when_its_token_expires(srv: RunningServer, rclient: redis.Redis) -> None:  # noqa: F811
    """The token's `exp` ends the socket as it ends /ws/jobs: 4401 "token expired"."""
    job = f"cp-expiring-{uuid.uuid4()}"
    Recorder(rclient, srv.services.settings).record(
        job, "PENDING", task="probe", owner=Owner("acme", "alice")
    )
    exp = int(time.time()) + 2
    got, code, reason = await socket_answers(
        f"{srv.ws_url}/celery-progress/{job}/?token={token('acme', exp=exp)}"
    )
    assert (code, reason) == (4401, "token expired")
    assert [a["state"] for a in got] == ["PENDING"]
    assert exp - 0.1 <= time.time() <= exp + 2


# -- celery-progress's own JS in Chromium --------------------------------------------------


def _celery_progress_static() -> Path:
    """celery-progress's static files, from the installed package (the `dev` extra)."""
    spec = importlib.util.find_spec("celery_progress")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the dev extra: pip install -e '.[dev]' (celery-progress)")
    return Path(next(iter(spec.submodule_search_locations))) / "static" / "celery_progress"


STATIC = _celery_progress_static()

# celery-progress's README markup and init call; the page records each message its bar
# shows, with the bar's width then (for the test only: celery-progress's code runs as shipped).
PAGE = """<!doctype html>
<html><body>
<div class='progress-wrapper'>
  <div id='progress-bar' class='progress-bar' style="background-color: #68a9ef; width: 0%;">&nbsp;</div>
</div>
<div id="progress-bar-message">Waiting for progress to start...</div>
<script src="/static/celery_progress/celery_progress.js"></script>
<script src="/static/celery_progress/websockets.js"></script>
<script>
window.seen = [];
const shown = document.getElementById("progress-bar-message");
const bar = document.getElementById("progress-bar");
new MutationObserver(() => window.seen.push([shown.textContent, bar.style.width]))
  .observe(shown, {childList: true, characterData: true, subtree: true});
document.addEventListener("DOMContentLoaded", function () {
  var progressUrl = __URL__;
  __BAR__.initProgressBar(progressUrl);
});
</script>
</body></html>"""


SUCCESS_COLOR, ERROR_COLOR = "rgb(118, 206, 96)", "rgb(220, 79, 99)"


async def open_bar(browser: Any, origin: str, url: str, *, bar: str = "CeleryProgressBar") -> Any:
    """A page on jobwire's origin (as a Django page would be on its own) whose bar follows `url`."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors

    async def serve_static(route: Any) -> None:
        name = route.request.url.rsplit("/", 1)[-1]
        await route.fulfill(body=(STATIC / name).read_text(), content_type="text/javascript")

    await page.route(f"{origin}/static/celery_progress/*", serve_static)
    # A document that jobwire's own server sent, then the page's markup written into it:
    # a document Playwright made up (`route.fulfill`) counts as a public site to Chromium,
    # which then refuses it a websocket to this loopback server (local network access).
    await page.goto(f"{origin}/healthz")
    await page.set_content(PAGE.replace("__URL__", json.dumps(url)).replace("__BAR__", bar))
    return page


async def bar_state(page: Any) -> tuple[str, str, str]:
    return await page.evaluate(  # type: ignore[no-any-return]
        """() => { const bar = document.getElementById("progress-bar");
                   return [document.getElementById("progress-bar-message").textContent,
                           bar.style.width, getComputedStyle(bar).backgroundColor]; }"""
    )


async def wait_for_message(page: Any, prefix: str, timeout: float = 20000) -> None:
    await page.wait_for_function(
        "p => document.getElementById('progress-bar-message').textContent.startsWith(p)",
        arg=prefix,
        timeout=timeout,
    )


@pytest.mark.browser
async def test_celery_progress_js_polls_its_bar_to_success(server: RunningServer, browser: Any) -> None:
    """celery_progress.js as shipped, only its URL pointing at jobwire: each custom state
    shows as progress ("2 of 3 processed. Processing data", never "Unknown state"), and
    the bar ends green with the task's result."""
    # Steps of a second: the bar polls every 500 ms, and the page may open after the first.
    job = await submit(server.url, "long_running_task", delay=1.0)
    page = await open_bar(browser, server.url, f"/celery-progress/{job}/")
    await wait_for_message(page, "Success! ")
    _, width, color = await bar_state(page)
    assert (width, color) == ("100%", SUCCESS_COLOR)
    seen = [tuple(shown) for shown in await page.evaluate("window.seen")]
    assert ("2 of 3 processed. Processing data", "66.67%") in seen
    assert ("3 of 3 processed. Uploading results", "100%") in seen
    assert not [m for m, _ in seen if "Unknown state" in m or "wrong" in m]
    summed = await submit(server.url, "plain_sum", numbers=[1, 2, 3])
    other = await open_bar(browser, server.url, f"/celery-progress/{summed}/")
    await wait_for_message(other, "Success! ")
    assert (await bar_state(other))[0] == "Success! 6"
    assert page.errors == other.errors == []


@pytest.mark.browser
async def test_celery_progress_js_shows_a_failure(server: RunningServer, browser: Any) -> None:
    """A failing task: celery-progress's error message, the exception's text, a red bar."""
    job = await submit(server.url, "failing_task", delay=0.1)
    page = await open_bar(browser, server.url, f"/celery-progress/{job}/")
    await wait_for_message(page, "Uh-Oh")
    message, _, color = await bar_state(page)
    assert message == "Uh-Oh, something went wrong! Simulated failure: the input file is corrupt at row 42"
    assert color == ERROR_COLOR


@pytest.mark.browser
async def test_celery_progress_websocket_js_follows_a_retry_to_success(
    srv: RunningServer,  # noqa: F811
    browser: Any,
) -> None:
    """websockets.js's CeleryWebSocketProgressBar with auth on, the token in its URL:
    the retry shows as celery-progress shows one and the socket stays open through it;
    then success, after which the page closes the socket."""
    job = await submit_as(srv, A, "retrying_task", delay=1.0, failures=1)
    url = f"/celery-progress/{job}/?token={A}"
    page = await open_bar(browser, srv.url, url, bar="CeleryWebSocketProgressBar")
    await wait_for_message(page, "Success! ")
    _, width, color = await bar_state(page)
    assert (width, color) == ("100%", SUCCESS_COLOR)
    seen = [m for m, _ in await page.evaluate("window.seen")]
    retrying = "Retrying after 1s: Upstream service unavailable..."
    assert retrying in seen and seen.index("1 of 1 processed. Attempt 2") > seen.index(retrying)
    channel = srv.services.settings.keys.job_channel(job)
    await wait_until(lambda: srv.services.hub.subscribers(channel) == 0, what="the socket is closed")
    assert not [m for m in seen if "Unknown state" in m]
    assert page.errors == []
