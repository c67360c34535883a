"""jobwire mounted inside a host app under a prefix: FastAPI, Starlette by hand, Django.

Each host is served by uvicorn as `jobwire serve` would serve it, with the session worker
running its jobs, and everything is reached under `/progress`: REST, `/ws`, SSE, the links a
job hands out, `openapi.json`, and the dashboard in Chromium.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import django
import httpx
import pytest
import websockets
from django.conf import settings as django_settings
from fastapi import FastAPI
from playwright.async_api import Browser, expect
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import jobwire
from jobwire.server.app import create_app
from jobwire.server.direct import RawSend
from jobwire.settings import Settings
from tests.clients import assert_gap_free, next_of, sse_blocks, transitions
from tests.support import RedisServer, free_port, run_server, settings_for, until_serving, wait_until
from tests.test_browser import CHROMIUM  # noqa: F401  (importing it applies the never-skip rule; the fixture: conftest)

PREFIX = "/progress"


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def _watch_ws(url: str, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
        while True:
            msg = await next_of(ws, "event", timeout=20)
            events.append(msg)
            if msg["final"]:
                return events


async def _check_everything_under_the_prefix(base: str, ws_base: str) -> None:
    """REST, links, openapi servers, /ws and SSE, all under the prefix."""
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        assert (await http.get(f"{PREFIX}/readyz")).status_code == 200
        call = {"task": "long_running_task", "kwargs": {"delay": 0.05}}
        resp = await http.post(f"{PREFIX}/api/v1/jobs", json=call)
        assert resp.status_code == 202, resp.text
        job = resp.json()
        job_id = job["job_id"]
        for name, link in job["links"].items():
            assert f"{PREFIX}/" in link, (name, link)
        doc = (await http.get(f"{PREFIX}/openapi.json")).json()
        assert doc["servers"] == [{"url": PREFIX}]
        events = await _watch_ws(f"{ws_base}{PREFIX}/ws", job_id)
        assert_gap_free(events)
        assert events[-1]["state"] == "SUCCESS"
        async with http.stream("GET", f"{PREFIX}/api/v1/jobs/{job_id}/events") as stream:
            assert stream.status_code == 200
            blocks = [b async for b in sse_blocks(stream)]
        sse = [json.loads(b["data"]) for b in blocks if b.get("event", "message") == "message"]
        assert transitions(sse) == transitions(events)
        # The fast path survived the host's middleware: live frames went straight to the socket.
        metrics = (await http.get(f"{PREFIX}/metrics")).text
        assert _metric(metrics, "jobwire_direct_writes_total") > 0, "no direct writes when mounted"


async def _dashboard_runs_a_job(browser: Browser, base: str) -> None:  # noqa: F811
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    await page.goto(f"{base}{PREFIX}")  # no trailing slash: redirected to the folder
    await expect(page.locator("#connection")).to_have_attribute("data-status", "live", timeout=15000)
    await expect(page.locator("#connection")).to_have_attribute("data-transport", "websocket")
    await page.wait_for_selector("#task option", state="attached")
    await page.select_option("#task", "long_running_task")
    await page.fill("#delay", "0.05")
    await page.click("#submit")
    await expect(page.locator(".job .badge.state").first).to_have_text("SUCCESS", timeout=20000)
    assert errors == [] and failed == [], (errors, failed)
    await page.close()


@pytest.mark.browser
async def test_fastapi_host_serves_jobwire_under_a_prefix(
    browser: Browser,  # noqa: F811
    settings: Settings,
    worker: object,
) -> None:
    """One call mounts jobwire in a FastAPI app: its lifespan joins the host's (after the
    host's start-up, before its shutdown), everything works under the prefix, and the
    server's goodbye (1001) reaches the mounted app's websockets."""
    seen: list[str] = []

    @asynccontextmanager
    async def host_lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen.append("host up")
        yield
        seen.append("host down")

    host = FastAPI(lifespan=host_lifespan)

    @host.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "from the host"}

    assert jobwire.mount(host, PREFIX, settings=settings) is host
    jobwire_app = next(r.app for r in host.routes if isinstance(r, Mount))
    lifecycle = jobwire_app.state.lifecycle
    async with run_server(settings, app=host) as srv:
        assert lifecycle.running and seen == ["host up"]
        assert (await httpx.AsyncClient().get(f"{srv.url}/hello")).json() == {"hello": "from the host"}
        await _check_everything_under_the_prefix(srv.url, srv.ws_url)
        await _dashboard_runs_a_job(browser, srv.url)
        ws = await websockets.connect(f"{srv.ws_url}{PREFIX}/ws")
        await next_of(ws, "welcome")
        srv.server.should_exit = True
        await wait_until(lambda: ws.close_code is not None, what="the goodbye")
        assert ws.close_code == 1001
    assert seen == ["host up", "host down"] and not lifecycle.running


async def test_mounted_by_hand_starts_at_first_use(settings: Settings, worker: object) -> None:
    """`Mount("/progress", create_app())` in a host whose lifespan knows nothing of jobwire:
    the first request starts the services (it used to answer 500). The host adds `RawSend`
    (the README's recipe) and the direct writes work."""
    jobwire_app = create_app(settings)
    host = Starlette(
        routes=[Mount(PREFIX, jobwire_app), Route("/", lambda r: PlainTextResponse("host"))],
        middleware=[Middleware(RawSend)],
    )
    async with run_server(settings, app=host) as srv:
        assert not jobwire_app.state.lifecycle.running
        async with httpx.AsyncClient(base_url=srv.url) as http:
            first = await http.get(f"{PREFIX}/api/v1/jobs/no-such-job")
            assert first.status_code == 404 and first.json()["error"]["code"] == "job_not_found"
            assert jobwire_app.state.lifecycle.running
        await _check_everything_under_the_prefix(srv.url, srv.ws_url)


def test_a_bad_prefix_or_a_started_host_is_refused(settings: Settings) -> None:
    for bad in ("progress", "", "/", "/a b", "/x?y=1"):
        with pytest.raises(ValueError, match="prefix"):
            jobwire.mount(FastAPI(), bad, settings=settings)
    with pytest.raises(TypeError, match="ASGI app"):
        jobwire.mount(object(), PREFIX, settings=settings)
    host = FastAPI()
    host.build_middleware_stack()
    host.middleware_stack = host.build_middleware_stack()
    with pytest.raises(RuntimeError, match="already started"):
        jobwire.mount(host, PREFIX, settings=settings)


# -- Django --------------------------------------------------------------------------------


def _django_app() -> Any:
    """A minimal Django project's ASGI application, with one view of its own."""
    if not django_settings.configured:
        module = type(sys)("jobwire_django_urls")
        from django.http import HttpResponse
        from django.urls import path

        module.urlpatterns = [path("hello/", lambda request: HttpResponse("hello from django"))]
        sys.modules[module.__name__] = module
        django_settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["127.0.0.1", "localhost"],
            ROOT_URLCONF=module.__name__,
            SECRET_KEY="test only",
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
        )
        django.setup()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


@pytest.mark.browser
async def test_django_asgi_project_serves_jobwire_under_a_prefix(
    browser: Browser,  # noqa: F811
    settings: Settings,
    worker: object,
) -> None:
    """The README's Django recipe: `application = jobwire.mount(get_asgi_application(), "/progress")`."""
    application = jobwire.mount(_django_app(), PREFIX, settings=settings)
    async with run_server(settings, app=application) as srv:
        assert application.lifecycle.running  # started by the lifespan, which Django refuses
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await http.get("/hello/")).text == "hello from django"
            bare = await http.get(PREFIX)
            assert bare.status_code == 307 and bare.headers["location"] == f"{PREFIX}/"
        await _check_everything_under_the_prefix(srv.url, srv.ws_url)
        await _dashboard_runs_a_job(browser, srv.url)
    assert not application.lifecycle.running


# -- `jobwire serve --app`: the host served as jobwire serves itself -----------------------

HOST_MODULE = """
from fastapi import FastAPI
import jobwire

app = jobwire.mount(FastAPI(), "/progress")
plain = FastAPI()
"""


async def test_jobwire_serve_app_says_goodbye_to_the_mounted_apps_clients(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """`jobwire serve --app main:app` serves the host with jobwire's uvicorn settings and its
    graceful goodbye: at SIGTERM the mounted app's websockets close 1001, not uvicorn's 1012.
    An app without jobwire mounted is refused with one line."""
    (tmp_path / "hostapp.py").write_text(HOST_MODULE)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JOBWIRE_")},
        "JOBWIRE_REDIS_URL": own_redis.url,
        "JOBWIRE_CELERY_APP": "jobwire.tasks.demo:app",
    }
    command = [sys.executable, "-m", "jobwire.cli", "serve"]
    refused = subprocess.run(
        [*command, "--app", "hostapp:plain"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "has no jobwire mounted" in refused.stdout + refused.stderr

    port = free_port()
    proc = subprocess.Popen([*command, "--app", "hostapp:app", "--port", str(port)], cwd=tmp_path, env=env)
    try:
        await until_serving(proc, port, PREFIX)
        async with websockets.connect(f"ws://127.0.0.1:{port}{PREFIX}/ws") as ws:
            await next_of(ws, "welcome")
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            assert ws.close_code == 1001
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# -- lifespans and leftovers ---------------------------------------------------------------


async def test_a_host_that_is_not_starlette_keeps_its_lifespan(settings: Settings, worker: object) -> None:
    """A FastAPI app behind a plain ASGI middleware (Sentry's, OpenTelemetry's) is wrapped,
    not mounted in place: its lifespan still runs, before jobwire's start and after its stop."""
    seen: list[tuple[str, bool]] = []

    @asynccontextmanager
    async def host_lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen.append(("host up", lifecycle.running))
        yield
        seen.append(("host down", lifecycle.running))

    class Wrapper:  # a middleware that is not Starlette's
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

    application = jobwire.mount(Wrapper(FastAPI(lifespan=host_lifespan)), PREFIX, settings=settings)
    lifecycle = application.lifecycle
    async with run_server(settings, app=application) as srv:
        assert seen == [("host up", False)] and lifecycle.running
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await http.get(f"{PREFIX}/readyz")).status_code == 200
    assert seen == [("host up", False), ("host down", False)]


async def test_a_request_after_the_lifespan_ended_is_told_to_come_back(settings: Settings) -> None:
    """Once its lifespan stopped the services, a late request gets 503 "try later" (a
    websocket 1001) and does not start them again, with nothing left to stop them."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert app.state.lifecycle.running
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobwire") as http:
        late = await http.get("/api/v1/jobs/some-job")
    assert late.status_code == 503 and late.headers["retry-after"] == "2"
    assert late.json()["error"]["code"] == "unavailable"
    assert not app.state.lifecycle.running


async def test_stopped_services_leave_no_redis_connection_behind(own_redis: RedisServer) -> None:
    """The read client owns its pool: a host that starts and stops jobwire (its lifespan,
    tests) gets every Redis connection back."""
    client = own_redis.client()
    baseline = int(client.info("clients")["connected_clients"])
    async with run_server(settings_for(own_redis.url)) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            answers = await asyncio.gather(*(http.get(f"/api/v1/jobs/job-{i}") for i in range(20)))
            assert {a.status_code for a in answers} == {404}
        assert int(client.info("clients")["connected_clients"]) > baseline

    def back_to_baseline() -> bool:
        return int(client.info("clients")["connected_clients"]) == baseline

    await wait_until(back_to_baseline, what="every connection the server opened is closed")
    client.close()
