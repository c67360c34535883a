"""Every refused websocket and SSE stream is said in jobwire's log, once, with its reason
and the client's address; a flood of refusals is said as one line per reason and window.

An adopter with the page and jobwire on two origins saw their websocket refused with a 403
and nothing in jobwire's log but uvicorn's "connection rejected (403 Forbidden)"; the
browser shows the page no reason at all.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from jobwire.server.refusals import RefusalLog
from jobwire.settings import Settings
from tests.support import run_server, wait_until
from tests.test_auth import AUDIENCE, SECRET, bearer

LOGGER = "jobwire.server.refusals"


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def said(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


async def test_an_origin_refusal_names_the_origin_and_the_variable(
    settings: Settings, said: pytest.LogCaptureFixture
) -> None:
    settings = settings.model_copy(update=dict(allowed_origins=("https://app.example",)))
    async with run_server(settings) as srv:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{srv.ws_url}/ws", origin="https://page.example")
        assert refused.value.response.status_code == 403
        host = srv.url.removeprefix("http://")
        assert _said(said) == [
            (
                logging.WARNING,
                "websocket refused (forbidden) from 127.0.0.1: Origin 'https://page.example' is neither "
                f"this server's own ('{host}') nor in JOBWIRE_ALLOWED_ORIGINS (https://app.example); "
                "add it there to let pages from it connect",
            )
        ]
        # Allowed origins, and clients that send none, say nothing.
        for origin in ("https://app.example", srv.url, None):
            async with websockets.connect(f"{srv.ws_url}/ws", origin=origin) as ws:
                await ws.recv()
        assert len(_said(said)) == 1


async def test_a_bad_token_is_said_for_websockets_and_sse(
    settings: Settings, said: pytest.LogCaptureFixture
) -> None:
    settings = settings.model_copy(update=dict(auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE))
    async with run_server(settings) as srv:
        async with websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer("not.a.jwt")) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 4401
        async with httpx.AsyncClient(base_url=srv.url) as http:
            sse = await http.get("/api/v1/events", params={"job": "x"})
        assert sse.status_code == 401
        lines = _said(said)
        assert lines[0][0] == logging.INFO
        assert lines[0][1].startswith("websocket refused (unauthenticated) from 127.0.0.1: invalid token: ")
        assert lines[1:] == [
            (
                logging.INFO,
                "sse refused (unauthenticated) from 127.0.0.1: a bearer token is required "
                "(Authorization: Bearer …, or ?token=)",
            )
        ]
        assert "not.a.jwt" not in said.text  # the token itself is never logged


async def test_transport_off_load_and_bad_requests_are_each_said_once(
    settings: Settings, said: pytest.LogCaptureFixture
) -> None:
    """A load refusal is decided in `Admission` and answered by the route (429): said once,
    for websockets and SSE alike."""
    off = settings.model_copy(update=dict(transports=("sse", "polling")))
    async with run_server(off) as srv:
        with pytest.raises(InvalidStatus):
            await websockets.connect(f"{srv.ws_url}/ws")
    assert _said(said) == [
        (
            logging.INFO,
            "websocket refused (transport_off) from 127.0.0.1: websockets are turned off here "
            "(JOBWIRE_TRANSPORTS=sse,polling)",
        )
    ]
    said.clear()
    full = settings.model_copy(update=dict(max_connections_per_address=1))
    async with run_server(full) as srv:
        srv.services.refusals = RefusalLog(every=0.0)  # nothing counted away: a second line would show
        async with websockets.connect(f"{srv.ws_url}/ws") as held:
            await held.recv()
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(f"{srv.ws_url}/ws")
            assert refused.value.response.status_code == 429
            async with httpx.AsyncClient(base_url=srv.url) as http:
                assert (await http.get("/api/v1/events", params={"job": "x"})).status_code == 429
        load = "refused (load) from 127.0.0.1: too many connections for this address (at most 1); retry later"
        assert _said(said) == [(logging.WARNING, f"websocket {load}"), (logging.WARNING, f"sse {load}")]
        said.clear()
        async with websockets.connect(f"{srv.ws_url}/ws/jobs/some-job?since=soon") as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 4400
        async with httpx.AsyncClient(base_url=srv.url) as http:
            sse = await http.get("/api/v1/jobs/some-job/events", params={"since": "soon"})
        assert sse.status_code == 422
        bad = "refused (bad_request) from 127.0.0.1: since must be a non-negative integer, got 'soon'"
        assert _said(said) == [(logging.INFO, f"websocket {bad}"), (logging.INFO, f"sse {bad}")]


async def test_a_flood_of_refusals_is_one_line_per_window(
    settings: Settings, said: pytest.LogCaptureFixture
) -> None:
    """Thirty refused upgrades in a burst: the first said at once, the other 29 counted and
    said in one line when the window ends (no later refusal needed to say them)."""
    settings = settings.model_copy(update=dict(allowed_origins=()))
    async with run_server(settings) as srv:
        srv.services.refusals = RefusalLog(every=1.0)
        for _ in range(30):
            with pytest.raises(InvalidStatus):
                await websockets.connect(f"{srv.ws_url}/ws", origin="https://page.example")
        assert len(_said(said)) == 1

        def counted() -> bool:
            return len(_said(said)) == 2

        await wait_until(counted, what="the window's count is said", timeout=5)
        level, line = _said(said)[1]
        assert level == logging.WARNING
        assert line.startswith(
            "websocket refused (forbidden) 29 more time(s) in the last 1s; "
            "the last from 127.0.0.1: Origin 'https://page.example'"
        )


def test_the_window_rule_without_an_event_loop(caplog: pytest.LogCaptureFixture) -> None:
    """With no loop to run a timer, the count is said before the next window's first line;
    reasons and transports are counted apart."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    now = [100.0]
    refusals = RefusalLog(every=10.0, clock=lambda: now[0])
    for _ in range(3):
        refusals("websocket", "unauthenticated", "invalid token: bad signature", "10.0.0.1")
    refusals("sse", "unauthenticated", "a bearer token is required", "10.0.0.2")
    refusals("websocket", "forbidden", "Origin 'x'", "10.0.0.3")
    now[0] += 10.0
    refusals("websocket", "unauthenticated", "invalid token: it has expired", "10.0.0.4")
    assert _said(caplog) == [
        (logging.INFO, "websocket refused (unauthenticated) from 10.0.0.1: invalid token: bad signature"),
        (
            logging.INFO,
            "sse refused (unauthenticated) from 10.0.0.2: a bearer token is required",
        ),
        (logging.WARNING, "websocket refused (forbidden) from 10.0.0.3: Origin 'x'"),
        (
            logging.INFO,
            "websocket refused (unauthenticated) 2 more time(s) in the last 10s; "
            "the last from 10.0.0.1: invalid token: bad signature",
        ),
        (logging.INFO, "websocket refused (unauthenticated) from 10.0.0.4: invalid token: it has expired"),
    ]


async def test_a_count_pending_at_shutdown_is_said_then_and_no_timer_outlives_the_server(
    settings: Settings, said: pytest.LogCaptureFixture
) -> None:
    """Refusals counted in a window that is still open when the server stops: their line is
    said as the services stop, and the window's timer is cancelled (it said it after the
    server had gone). A refusal after that is said at once."""
    settings = settings.model_copy(update=dict(allowed_origins=()))
    async with run_server(settings) as srv:
        refusals = srv.services.refusals = RefusalLog(every=60.0)
        for _ in range(3):
            with pytest.raises(InvalidStatus):
                await websockets.connect(f"{srv.ws_url}/ws", origin="https://page.example")
        [window] = refusals._windows.values()
        timer = window.timer
        assert timer is not None and len(_said(said)) == 1
    assert timer.cancelled()
    lines = _said(said)
    assert len(lines) == 2
    assert lines[1][1].startswith("websocket refused (forbidden) 2 more time(s) in the last 60s; the last ")
    refusals("sse", "forbidden", "Origin 'x'", "10.0.0.9")
    assert _said(said)[2:] == [(logging.WARNING, "sse refused (forbidden) from 10.0.0.9: Origin 'x'")]
    assert not refusals._windows
