"""`/metrics` is for operators: the admin scope on the main port, or a listener of its own
(`JOBWIRE_METRICS_ADDR`) and then not on the main port; a scrape costs Redis nothing."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from jobwire.server.auth import Principal
from jobwire.settings import Settings
from tests.support import RedisServer, free_port, run_server, settings_for, until_serving, wait_until
from tests.test_auth import ADMIN, AUDIENCE, SECRET, B, bearer
from tests.test_recorder import Monitor


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return settings.model_copy(update=dict(auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE))


def _latency(text: str) -> float:
    match = re.search(r"^jobwire_redis_ping_seconds (\S+)$", text, re.M)
    assert match, "jobwire_redis_ping_seconds not in /metrics"
    return float(match.group(1))


async def test_metrics_need_the_admin_scope_when_auth_is_on(auth_settings: Settings) -> None:
    """No token: 401; a tenant's token, or an admin's link token for one job: 403 (JSON
    errors, as everywhere); an admin's token: the metrics."""
    async with run_server(auth_settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        anonymous = await http.get("/metrics")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "unauthenticated"
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/metrics", headers=bearer("not-a-token"))).status_code == 401
        link, _ = srv.services.auth.mint_link(Principal("root", None, admin=True), "some-job")
        for tok in (B, link):
            tenant = await http.get("/metrics", headers=bearer(tok))
            assert tenant.status_code == 403
            assert tenant.json() == {"error": {"code": "forbidden", "message": "this needs the admin scope"}}
            assert "jobwire_" not in tenant.text
        admin = await http.get("/metrics", headers=bearer(ADMIN))
        assert admin.status_code == 200
        assert "jobwire_connections" in admin.text and "jobwire_redis_ping_seconds" in admin.text


async def test_metrics_on_their_own_listener_and_not_on_the_main_port(auth_settings: Settings) -> None:
    """With JOBWIRE_METRICS_ADDR the listener answers (the operators' network: no token)
    and the main port has no /metrics, even for an admin."""
    port = free_port()
    settings = auth_settings.model_copy(update={"metrics_addr": f"127.0.0.1:{port}"})
    async with run_server(settings) as srv, httpx.AsyncClient() as http:
        scraped = await http.get(f"http://127.0.0.1:{port}/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        assert "jobwire_connections" in scraped.text
        assert (await http.get(f"http://127.0.0.1:{port}/api/v1/jobs")).status_code == 404
        main = await http.get(f"{srv.url}/metrics", headers=bearer(ADMIN))
        assert main.status_code == 404 and main.json()["error"]["code"] == "not_found"
    # The listener ends with the server.
    with httpx.Client() as http:
        try:
            http.get(f"http://127.0.0.1:{port}/metrics")
            raise AssertionError("the metrics listener outlived its server")
        except httpx.ConnectError:
            pass


async def test_jobwire_serve_serves_metrics_on_jobwire_metrics_addr(own_redis: RedisServer) -> None:
    """The real command: the listener at JOBWIRE_METRICS_ADDR, none on the main port, and
    SIGTERM still stops the whole server (the listener leaves the signals to it)."""
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "JOBWIRE_REDIS_URL": own_redis.url,
        "JOBWIRE_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "JOBWIRE_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "jobwire.cli", "serve", "--port", str(port)], env=env)
    try:
        await until_serving(proc, port)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/metrics")).status_code == 404
            scraped = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert scraped.status_code == 200 and "jobwire_events_total" in scraped.text
        proc.terminate()
        # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is a clean exit.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_scrape_sends_nothing_to_redis(own_redis: RedisServer) -> None:
    """Twenty scrapes cost Redis no command: the latency is the hub's own keepalive PING
    (one every 5 s, whatever the scrapers do)."""
    async with run_server(settings_for(own_redis.url)) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        await wait_until(lambda: srv.services.hub.ping_seconds is not None, what="the hub's first PING")
        monitor = Monitor(own_redis)
        started = time.monotonic()
        texts = [(await http.get("/metrics")).text for _ in range(20)]
        elapsed = time.monotonic() - started
        commands = monitor.stop()
    assert set(commands) <= {"PING"}, commands
    assert commands.count("PING") <= 1 + int(elapsed / 5), (commands, elapsed)  # the hub's, at most
    latency = _latency(texts[-1])
    assert math.isfinite(latency) and 0 < latency < 1
