"""Authentication and tenant isolation, tried as a hostile client would.

A tenant must never see, watch, cancel or even learn of another tenant's job: every answer
about another tenant's job is compared, body for body, with the answer for an id that
never existed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import redis
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from jobwire.client import Jobwire, JobwireError, watch
from jobwire.server.auth import RedactTokens
from jobwire.settings import Settings
from jobwire.tasks.recorder import Owner, Recorder
from tests.clients import next_of, recv_json, sse_blocks
from tests.support import RunningServer, run_server, wait_until
from tests.test_client_cli import _cli

SECRET = "test-secret-for-jobwire-auth-0123456789"
AUDIENCE = "jobwire-tests"


def token(
    tenant: str | None = "acme", sub: str = "alice", *, secret: str = SECRET, ttl: float = 300, **claims: Any
) -> str:
    body: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), "aud": AUDIENCE, **claims}
    if tenant is not None:
        body["tenant"] = tenant
    return jwt.encode(body, secret, algorithm="HS256")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


# Made at import, used whenever the suite gets there: they must outlive a whole run.
DAY = 86400
A, B, ADMIN = (
    token("acme", ttl=DAY),
    token("globex", "bob", ttl=DAY),
    token(None, "root", ttl=DAY, scope="admin"),
)


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update=dict(
            auth="jwt",
            jwt_secret=SECRET,
            jwt_audience=AUDIENCE,
            allowed_origins=("http://allowed.example",),
            auth_timeout=1.0,
        )
    )


@pytest.fixture
async def srv(auth_settings: Settings, worker: object) -> AsyncIterator[RunningServer]:
    async with run_server(auth_settings) as running:
        yield running


async def submit_as(srv: RunningServer, tok: str, task: str = "long_running_task", **kwargs: Any) -> str:
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(tok)) as http:
        resp = await http.post("/api/v1/jobs", json={"task": task, "kwargs": kwargs})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["job_id"])


async def watch_until_final(srv: RunningServer, tok: str, job_id: str) -> list[dict[str, Any]]:
    async with websockets.connect(f"{srv.ws_url}/ws/jobs/{job_id}", additional_headers=bearer(tok)) as ws:
        events = []
        async for frame in ws:
            msg = json.loads(frame)
            if msg["type"] == "event":
                events.append(msg)
    return events


def same_answer(foreign: Any, unknown: Any, foreign_id: str, unknown_id: str) -> bool:
    """The two answers are equal once each id is replaced by a placeholder."""
    return json.dumps(foreign).replace(foreign_id, "<id>") == json.dumps(unknown).replace(unknown_id, "<id>")


async def sse_messages(http: httpx.AsyncClient, params: Any) -> list[dict[str, Any]]:
    out = []
    async with http.stream("GET", "/api/v1/events", params=params) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


async def test_another_tenants_job_reads_exactly_as_an_unknown_id(srv: RunningServer) -> None:
    """Tenant B: status, history, SSE, multiplexed SSE, batch, revoke and both websockets
    answer for A's job exactly as for an id that never existed. A's job is untouched."""
    job = await submit_as(srv, A, delay=0.3)
    ghost = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(B), timeout=10) as http:
        for method, path in [
            ("GET", ""),
            ("GET", "/history"),
            ("GET", "/events"),
            ("DELETE", ""),
            ("POST", "/token"),
        ]:
            foreign = await http.request(method, f"/api/v1/jobs/{job}{path}")
            unknown = await http.request(method, f"/api/v1/jobs/{ghost}{path}")
            assert foreign.status_code == unknown.status_code == 404, (method, path)
            assert same_answer(foreign.json(), unknown.json(), job, ghost), (method, path)
        batch = (await http.post("/api/v1/jobs/batch-status", json=[job, ghost])).json()["jobs"]
        assert batch[job] == batch[ghost] == {"status": "UNKNOWN", "ready": False, "seq": 0}
        foreign_sse = await sse_messages(http, [("job", job)])
        unknown_sse = await sse_messages(http, [("job", ghost)])
        assert same_answer(foreign_sse, unknown_sse, job, ghost)
        listed = (await http.get("/api/v1/jobs")).json()["jobs"]
        assert job not in [j["job_id"] for j in listed]
    async with websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer(B)) as ws:
        answers = []
        for job_id in (job, ghost):
            await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
            answers.append(await next_of(ws, "error", "event"))
        assert same_answer(answers[0], answers[1], job, ghost)
    for job_id in (job, ghost):
        async with websockets.connect(f"{srv.ws_url}/ws/jobs/{job_id}", additional_headers=bearer(B)) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4404, "job not found")
    # A's job ran to the end, unrevoked; A and an admin see it.
    events = await watch_until_final(srv, A, job)
    assert events[-1]["state"] == "SUCCESS"
    async with httpx.AsyncClient(base_url=srv.url) as http:
        for tok in (A, ADMIN):
            listed = (await http.get("/api/v1/jobs", headers=bearer(tok))).json()["jobs"]
            assert job in [j["job_id"] for j in listed]


async def test_subscribe_all_is_scoped_to_the_tenant(srv: RunningServer) -> None:
    """B's all-jobs stream never carries A's events; A's and the admin's do."""
    streams = {}
    for name, tok in (("A", A), ("B", B), ("admin", ADMIN)):
        ws = await websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer(tok))
        await ws.send(json.dumps({"op": "subscribe_all"}))
        await next_of(ws, "subscribed_all")
        streams[name] = ws
    try:
        a_job = await submit_as(srv, A, delay=0.01)
        await watch_until_final(srv, A, a_job)
        b_job = await submit_as(srv, B, delay=0.01)  # published after every event of A's job

        async def seen_until(ws: Any, job_id: str) -> set[str]:
            seen: set[str] = set()
            while True:
                msg = await next_of(ws, "event")
                seen.add(msg["job_id"])
                if msg["job_id"] == job_id and msg["final"]:
                    return seen

        assert a_job not in await seen_until(streams["B"], b_job)
        assert a_job in await seen_until(streams["A"], a_job)
        assert {a_job, b_job} <= await seen_until(streams["admin"], b_job)
    finally:
        for ws in streams.values():
            await ws.close()


@pytest.mark.parametrize(
    ("name", "tok"),
    [
        ("expired", token(exp=int(time.time()) - 60)),
        ("forged", token(secret="not-the-secret-at-all-0123456789")),
        ("wrong audience", token(aud="someone-else")),
        (
            "alg none",
            jwt.encode(
                {"sub": "x", "tenant": "acme", "exp": int(time.time()) + 60, "aud": AUDIENCE},
                None,
                algorithm="none",
            ),
        ),
        ("no tenant", token(None)),
        ("garbage", "not.a.jwt"),
    ],
)
async def test_bad_tokens_are_refused(srv: RunningServer, name: str, tok: str) -> None:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        resp = await http.get("/api/v1/jobs", headers=bearer(tok))
        assert resp.status_code == 401, name
        assert resp.json()["error"]["code"] == "unauthenticated"
        assert resp.headers["www-authenticate"] == "Bearer"
        sse = await http.get("/api/v1/events", params={"job": "x", "token": tok})
        assert sse.status_code == 401
    async with websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer(tok)) as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4401, name


async def test_no_token_is_401_and_websockets_get_a_deadline(srv: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/api/v1/jobs")).status_code == 401
        assert (await http.get("/api/v1/tasks")).status_code == 401
        assert (await http.get("/healthz")).status_code == 200  # probes need no token
    started = time.monotonic()
    async with websockets.connect(f"{srv.ws_url}/ws") as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4401 and "no token within" in ws.close_reason
    assert time.monotonic() - started < 5
    # Browsers cannot set headers on a websocket: the token may come in the first message.
    async with websockets.connect(f"{srv.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "auth", "token": A}))
        assert (await recv_json(ws))["type"] == "welcome"


@pytest.mark.parametrize("minter", [A, ADMIN], ids=["tenant", "admin"])
async def test_single_job_token_watches_that_job_only(srv: RunningServer, minter: str) -> None:
    """A link token, minted by the job's tenant or by an admin, watches its job on every
    transport, and nothing else: no other job (its tenant's or another's), no action, no
    listing, no all-jobs stream, no admin endpoint."""
    job = await submit_as(srv, A, delay=0.2)
    sibling = await submit_as(srv, A, delay=0.01)  # same tenant, still not allowed
    foreign = await submit_as(srv, B, delay=0.01)
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(minter)) as http:
        minted = await http.post(f"/api/v1/jobs/{job}/token")
    assert minted.status_code == 201, minted.text
    link = minted.json()["token"]
    assert minted.json()["links"]["ws"].endswith(f"/ws/jobs/{job}?token={link}")
    ghost = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(link)) as http:
        assert (await http.get(f"/api/v1/jobs/{job}")).status_code == 200
        assert (await http.get(f"/api/v1/jobs/{job}/history")).status_code == 200
        unknown = await http.get(f"/api/v1/jobs/{ghost}")
        for other in (sibling, foreign):
            resp = await http.get(f"/api/v1/jobs/{other}")
            assert resp.status_code == 404 and same_answer(resp.json(), unknown.json(), other, ghost)
        for method, path, body in [
            ("GET", "/api/v1/jobs", None),
            ("POST", "/api/v1/jobs", {"task": "long_running_task"}),
            ("DELETE", f"/api/v1/jobs/{job}", None),
            ("POST", f"/api/v1/jobs/{job}/token", None),
            ("GET", "/api/v1/admin/rate-limits", None),
        ]:
            resp = await http.request(method, path, json=body)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden", (method, path)
        sse = asyncio.create_task(sse_messages(http, [("job", job), ("job", sibling)]))
        async with websockets.connect(f"{srv.ws_url}/ws?token={link}") as ws:
            for other in (sibling, foreign):
                await ws.send(json.dumps({"op": "subscribe", "job_ids": [other]}))
                assert (await next_of(ws, "error"))["code"] == "job_not_found"
            await ws.send(json.dumps({"op": "subscribe_all"}))
            assert (await next_of(ws, "error"))["code"] == "forbidden"
        events = await watch_until_final(srv, link, job)
        assert events[-1]["state"] == "SUCCESS"
        streamed = await asyncio.wait_for(sse, 20)
    assert [m["state"] for m in streamed if "state" in m][-1] == "SUCCESS"
    assert {m["job_id"] for m in streamed if "job_id" in m} == {job, sibling}  # sibling: refused
    assert [m["code"] for m in streamed if m.get("type") == "error"] == ["job_not_found"]


async def test_every_stream_ends_when_its_token_expires(srv: RunningServer, rclient: redis.Redis) -> None:
    """At the token's `exp`, /ws/jobs closes 4401 "token expired", and both SSE streams end
    with one `unauthenticated` "token expired" error and no `end` (which would tell the
    client not to come back). With a new token each resumes where it stopped, to the end."""
    job = f"expiring-{uuid.uuid4()}"
    recorder = Recorder(rclient, srv.services.settings)
    recorder.record(job, "PENDING", task="probe", owner=Owner("acme", "alice"))  # never ends by itself
    exp = int(time.time()) + 3
    short = token("acme", exp=exp)
    ended: dict[str, float] = {}
    blocks: dict[str, list[dict[str, str]]] = {"job": [], "many": []}

    async def sse(name: str, path: str, params: dict[str, str]) -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            async with http.stream("GET", path, params=params, headers=bearer(short)) as resp:
                assert resp.status_code == 200
                async for block in sse_blocks(resp):
                    blocks[name].append(block)
        ended[name] = time.time()

    streams = [
        asyncio.create_task(sse("job", f"/api/v1/jobs/{job}/events", {})),
        asyncio.create_task(sse("many", "/api/v1/events", {"job": job})),
    ]
    ws = await websockets.connect(f"{srv.ws_url}/ws/jobs/{job}", additional_headers=bearer(short))
    channel = srv.services.settings.keys.job_channel(job)
    await wait_until(
        lambda: srv.services.hub.subscribers(channel) == 3, what="the three streams watch the job"
    )
    recorder.record(job, "WORKING", progress={"step": 1})  # live, before the token expires
    await asyncio.wait_for(ws.wait_closed(), 10)
    ended["ws"] = time.time()
    assert (ws.close_code, ws.close_reason) == (4401, "token expired")
    await asyncio.wait_for(asyncio.gather(*streams), 10)
    for name, when in ended.items():
        assert exp - 0.1 <= when <= exp + 1.5, (name, when - exp)  # at exp, not before, not much after
    expired = {"type": "error", "code": "unauthenticated", "message": "token expired"}
    for name, seen in blocks.items():
        events = [json.loads(b["data"]) for b in seen if "event" not in b]
        assert [e["state"] for e in events] == ["PENDING", "WORKING"], name
        assert seen[-1]["event"] == "control" and json.loads(seen[-1]["data"]) == expired, name
        assert sum(json.loads(b["data"]) == expired for b in seen) == 1, name
    # The client comes back with a new token, from where it stopped, and follows to the end.
    recorder.record(job, "SUCCESS", result=1)
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(A), timeout=10) as http:
        last_id = blocks["job"][-2]["id"]
        async with http.stream(
            "GET", f"/api/v1/jobs/{job}/events", headers={"Last-Event-ID": last_id}
        ) as resp:
            resumed = [json.loads(b["data"]) async for b in sse_blocks(resp)]
        assert [e["state"] for e in resumed] == ["SUCCESS"]
        since = {"job": job, "since": f"{job}:2"}
        async with http.stream("GET", "/api/v1/events", params=since) as resp:
            resumed = [json.loads(b["data"]) async for b in sse_blocks(resp)]
        assert [e.get("state", e.get("type")) for e in resumed] == ["SUCCESS", "subscribed", "end"]


async def test_websocket_origin_is_checked(srv: RunningServer) -> None:
    """Cross-site websocket hijacking: a page on another site cannot open a socket."""
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(f"{srv.ws_url}/ws?token={A}", origin="http://evil.example")
    assert refused.value.response.status_code == 403
    for origin in ("http://allowed.example", srv.url):  # an allowed origin, and the server's own
        async with websockets.connect(f"{srv.ws_url}/ws?token={A}", origin=origin) as ws:
            assert (await recv_json(ws))["type"] == "welcome"


async def test_cors_and_csrf(srv: RunningServer) -> None:
    """REST CORS follows the allowed origins; a text/plain POST (what a cross-site form or
    no-preflight fetch can send) is 415 and submits nothing."""
    async with httpx.AsyncClient(base_url=srv.url) as http:
        ok = await http.options(
            "/api/v1/jobs",
            headers={"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST"},
        )
        assert ok.headers.get("access-control-allow-origin") == "http://allowed.example"
        evil = await http.options(
            "/api/v1/jobs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in evil.headers
        before = len((await http.get("/api/v1/jobs", headers=bearer(A))).json()["jobs"])
        plain = await http.post(
            "/api/v1/jobs",
            content=b'{"task": "long_running_task"}',
            headers={**bearer(A), "content-type": "text/plain"},
        )
        assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
        assert len((await http.get("/api/v1/jobs", headers=bearer(A))).json()["jobs"]) == before


async def test_submits_per_user_are_rate_limited(auth_settings: Settings, worker: object) -> None:
    settings = auth_settings.model_copy(update=dict(submits_per_minute=3))
    user = token("acme", f"burst-{uuid.uuid4()}")
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, headers=bearer(user)) as http:
        codes = []
        for _ in range(5):
            resp = await http.post("/api/v1/jobs", json={"task": "long_running_task", "kwargs": {"delay": 0}})
            codes.append(resp.status_code)
        assert codes == [202, 202, 202, 429, 429]
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["code"] == "rate_limited"
        other = await http.post(
            "/api/v1/jobs", json={"task": "long_running_task", "kwargs": {"delay": 0}}, headers=bearer(B)
        )
        assert other.status_code == 202  # another user's bucket is their own


async def test_connections_per_address_are_limited(auth_settings: Settings, worker: object) -> None:
    settings = auth_settings.model_copy(update=dict(max_connections_per_address=3))
    async with run_server(settings) as srv:
        held = [await websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer(A)) for _ in range(3)]
        # Refused before the upgrade (the cheapest answer to a flood of sockets), as "later".
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer(A))
        assert refused.value.response.status_code == 429
        async with httpx.AsyncClient(base_url=srv.url) as http:
            sse = await http.get("/api/v1/events", params={"job": "x"}, headers=bearer(A))
            assert sse.status_code == 429
        await held.pop().close()
        async with websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer(A)) as ws:
            assert (await recv_json(ws))["type"] == "welcome"  # a slot freed up
        for ws in held:
            await ws.close()


def test_tokens_never_reach_the_access_log() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/api/v1/events?job=x&token={A}&all=1", "1.1", 200),
        None,
    )
    RedactTokens().filter(record)
    assert A not in record.getMessage() and "token=[redacted]&all=1" in record.getMessage()


async def test_tokens_never_reach_the_log_of_a_websocket_upgrade(
    srv: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn logs each websocket upgrade, query string and all, to uvicorn.error (not the
    access log): `?token=` is how a celery-progress socket and link URLs carry a token."""
    caplog.set_level(logging.INFO, logger="uvicorn.error")  # after uvicorn set its own level
    async with websockets.connect(f"{srv.ws_url}/ws?token={A}&x=1") as ws:
        await next_of(ws, "welcome")
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert any("/ws?token=[redacted]&x=1" in line for line in lines), lines
    assert not any(A in line for line in lines)


async def test_development_mode_says_so(
    settings: Settings, worker: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="jobwire.server.auth"):
        async with run_server(settings):
            pass
    assert any(
        "JOBWIRE_AUTH=none" in r.getMessage() and "never expose it" in r.getMessage() for r in caplog.records
    )


async def test_python_client_and_cli_carry_the_token(srv: RunningServer) -> None:
    async with Jobwire(srv.url, token=A) as api:
        job = await api.submit("long_running_task", delay=0.01)
        link = (await api.link_token(job))["token"]
    states = [e["state"] async for e in watch(job, srv.url, token=link)]
    assert states[-1] == "SUCCESS"
    with pytest.raises(JobwireError) as refused:
        async for _ in watch(job, srv.url, token=token(secret="wrong-secret-wrong-secret-0123456789")):
            pass
    assert refused.value.code == "unauthenticated"
    code, out = await _cli(srv.url, "--token", A, "submit", "long_running_task", "delay=0.01", "--watch")
    assert code == 0, out
    code, out = await _cli(srv.url, "status", job)  # no token
    assert code == 4 and "unauthenticated" in out


async def test_watch_asks_its_token_function_again_when_the_token_expires(srv: RunningServer) -> None:
    """Tokens that live 1-2 s, a job of 4 s: at each expiry (4401 "token expired") watch()
    asks its function (async here; sync for Jobwire) for a new token and resumes from its
    last seq, to SUCCESS, with every event of the job's history once, in order."""
    asked = 0

    async def fresh() -> str:
        nonlocal asked
        asked += 1
        return token("acme", exp=int(time.time()) + 2)

    async with Jobwire(srv.url, token=lambda: token("acme")) as api:
        job = await api.submit("report_steps", steps=8, delay=0.5)
    async with asyncio.timeout(30):
        events = [e async for e in watch(job, srv.url, token=fresh)]
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(A)) as http:
        history = (await http.get(f"/api/v1/jobs/{job}/history")).json()["events"]
    assert events[-1]["state"] == "SUCCESS"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [(e["seq"], e["state"]) for e in events] == [(e["seq"], e["state"]) for e in history]
    assert asked >= 3, asked  # the first token, and a new one at each of at least two expiries


async def test_watch_with_a_fixed_token_raises_when_it_expires(srv: RunningServer) -> None:
    short = token("acme", exp=int(time.time()) + 2)
    job = await submit_as(srv, A, "report_steps", steps=8, delay=0.5)
    seen = []
    with pytest.raises(JobwireError) as refused:
        async with asyncio.timeout(30):
            async for event in watch(job, srv.url, token=short):
                seen.append(event["state"])
    assert (refused.value.code, refused.value.message) == ("unauthenticated", "token expired")
    assert "SUCCESS" not in seen


async def test_new_connections_per_address_are_paced(settings: Settings, worker: object) -> None:
    """One address opening sockets in a burst: past the pace's burst, refused before the upgrade."""
    async with run_server(settings.model_copy(update=dict(new_connections_per_second=1.0))) as srv:
        held = [await websockets.connect(f"{srv.ws_url}/ws") for _ in range(2)]  # the burst: 2 x 1/s
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{srv.ws_url}/ws")
        assert refused.value.response.status_code == 429
        for ws in held:
            await ws.close()


async def test_rate_limit_admin_needs_the_admin_scope(srv: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        for tok in (A, B):
            resp = await http.put("/api/v1/admin/rate-limits/x", json={"rate": "1/s"}, headers=bearer(tok))
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
            assert (
                await http.get("/api/v1/admin/rate-limits/celery", headers=bearer(tok))
            ).status_code == 403
        assert (await http.get("/api/v1/admin/rate-limits", headers=bearer(ADMIN))).status_code == 200
