"""Owners without headers: `jobwire.owner()`, `attach(owner=...)`, `mint_token()` and
single-tenant mode, against a real worker and a real server with authentication on.

A job published by plain Celery code (`.delay()`) used to have no owner, so every user's
token was told `job_not_found` for it. Each test publishes from this process, as an app's
web code does, and asks the server as a tenant's token would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
import redis
import websockets
from celery import Celery, chord, group
from websockets.exceptions import ConnectionClosed

import jobwire
from jobwire.owner import current_owner
from jobwire.protocol import SUBJECT_HEADER, TENANT_HEADER
from jobwire.settings import Settings, SettingsError
from jobwire.tasks.demo import create_demo_app
from jobwire.tokens import TokenError, mint_token
from tests.support import ROOT, RunningServer, run_server, wait_until
from tests.test_auth import AUDIENCE, SECRET, bearer, same_answer, token, watch_until_final

# Made at import, used whenever the suite gets there: they must outlive a whole run.
ACME, GLOBEX = token("acme", "alice", ttl=86400), token("globex", "bob", ttl=86400)
ADMIN, NO_TENANT = token(None, "root", ttl=86400, scope="admin"), token(None, "carol", ttl=86400)


def auth_on(settings: Settings, **more: Any) -> Settings:
    return settings.model_copy(
        update=dict(auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE, auth_timeout=1.0, **more)
    )


@pytest.fixture
async def srv(settings: Settings, worker: object) -> AsyncIterator[RunningServer]:
    async with run_server(auth_on(settings)) as running:
        yield running


@pytest.fixture
async def single(settings: Settings, worker: object) -> AsyncIterator[RunningServer]:
    async with run_server(auth_on(settings, tenancy="single")) as running:
        yield running


def celery_of(srv: RunningServer) -> Celery:
    """The server's (attached) demo app, current in this thread: with several attached
    apps in one process, the publish signal records for the thread's current one."""
    app: Celery = srv.services.celery
    app.set_current()
    return app


def owner_in_redis(rclient: redis.Redis, srv: RunningServer, job_id: str) -> tuple[str, str] | None:
    tenant, sub = rclient.hmget(srv.services.settings.keys.job(job_id), "tenant", "sub")
    return (tenant.decode(), sub.decode()) if tenant else None


async def status(srv: RunningServer, tok: str, job_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(tok)) as http:
        return await http.get(f"/api/v1/jobs/{job_id}")


async def visible(srv: RunningServer, tok: str, *job_ids: str) -> dict[str, bool]:
    """Which of `job_ids` exist for `tok` (batch status: one request for many)."""
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(tok)) as http:
        resp = await http.post("/api/v1/jobs/batch-status", json=list(job_ids))
    assert resp.status_code == 200, resp.text
    return {j: row["status"] != "UNKNOWN" for j, row in resp.json()["jobs"].items()}


async def ws_refused(srv: RunningServer, tok: str, job_id: str) -> tuple[int | None, str | None]:
    async with websockets.connect(f"{srv.ws_url}/ws/jobs/{job_id}", additional_headers=bearer(tok)) as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    return ws.close_code, ws.close_reason


# -- jobwire.owner() ---------------------------------------------------------------------


async def test_a_job_published_in_an_owner_block_is_its_tenants(
    srv: RunningServer, rclient: redis.Redis
) -> None:
    """`.delay()` inside `jobwire.owner("acme", "alice")`: acme's token reads and watches it
    to the end; globex's gets exactly the answers of an id that never existed."""
    celery = celery_of(srv)
    with jobwire.owner("acme", "alice"):
        job = celery.tasks["long_running_task"].delay(delay=0.05).id
    assert owner_in_redis(rclient, srv, job) == ("acme", "alice")
    assert (await status(srv, ACME, job)).status_code == 200
    ghost = str(uuid.uuid4())
    foreign, unknown = await status(srv, GLOBEX, job), await status(srv, GLOBEX, ghost)
    assert foreign.status_code == unknown.status_code == 404
    assert same_answer(foreign.json(), unknown.json(), job, ghost)
    assert await ws_refused(srv, GLOBEX, job) == (4404, "job not found")
    events = await watch_until_final(srv, ACME, job)
    assert [e["state"] for e in events][-1] == "SUCCESS"
    # The worker's events named the owner too (it rode in the message's headers).
    assert owner_in_redis(rclient, srv, job) == ("acme", "alice")


async def test_outside_a_block_a_job_has_no_owner(srv: RunningServer, rclient: redis.Redis) -> None:
    celery = celery_of(srv)
    with jobwire.owner("acme", "alice"):
        pass
    assert current_owner() is None
    job = celery.tasks["plain_sum"].delay([1, 2]).id
    assert owner_in_redis(rclient, srv, job) is None
    assert await visible(srv, ACME, job) == {job: False}
    assert await visible(srv, ADMIN, job) == {job: True}  # owner-less: the admin's only


async def test_every_way_of_publishing_in_a_block_carries_the_owner(
    srv: RunningServer, rclient: redis.Redis
) -> None:
    """`.apply_async`, `send_task`, a group's and a chord's header tasks, published in the
    block; the chord's callback, which the worker publishes when the header ends, inherits
    its parent's owner. Headers a publish names itself win over the block."""
    celery = celery_of(srv)
    plain_sum = celery.tasks["plain_sum"]
    with jobwire.owner("acme", "alice"):
        applied = plain_sum.apply_async(([1],)).id
        sent = celery.send_task("plain_sum", args=([2],)).id
        grouped = group(plain_sum.s([3]), plain_sum.s([4])).apply_async()
        chorded = chord([plain_sum.s([5]), plain_sum.s([6])])(plain_sum.s())
        explicit = plain_sum.apply_async(([7],), headers={TENANT_HEADER: "globex", SUBJECT_HEADER: "bob"}).id
    header_ids = [r.id for r in grouped.results] + [r.id for r in chorded.parent.results]
    acme_jobs = [applied, sent, *header_ids]
    assert chorded.get(timeout=20) == 11  # the callback ran: it was published and recorded
    await wait_until(
        lambda: owner_in_redis(rclient, srv, chorded.id), what="the chord's callback is recorded"
    )
    acme_jobs.append(chorded.id)
    assert {j: owner_in_redis(rclient, srv, j) for j in acme_jobs} == {
        j: ("acme", "alice") for j in acme_jobs
    }
    assert owner_in_redis(rclient, srv, explicit) == ("globex", "bob")
    assert await visible(srv, ACME, *acme_jobs, explicit) == {**{j: True for j in acme_jobs}, explicit: False}
    assert await visible(srv, GLOBEX, *acme_jobs, explicit) == {
        **{j: False for j in acme_jobs},
        explicit: True,
    }


async def test_nested_blocks_restore_the_outer_owner(srv: RunningServer, rclient: redis.Redis) -> None:
    celery = celery_of(srv)
    publish = celery.tasks["plain_sum"].delay
    with jobwire.owner("acme", "alice"):
        before = publish([1]).id
        with jobwire.owner("globex", "bob"):
            inner = publish([2]).id
        after = publish([3]).id
        with pytest.raises(RuntimeError), jobwire.owner("initech", "peter"):
            raise RuntimeError("leaving the block by an exception restores the owner too")
        after_error = publish([4]).id
    owners = {j: owner_in_redis(rclient, srv, j) for j in (before, inner, after, after_error)}
    assert owners == {
        before: ("acme", "alice"),
        inner: ("globex", "bob"),
        after: ("acme", "alice"),
        after_error: ("acme", "alice"),
    }


async def test_threads_each_publish_with_their_own_owner(srv: RunningServer, rclient: redis.Redis) -> None:
    """Two threads inside blocks at the same moment (a barrier holds both inside), as two
    web requests would be: each job gets its own thread's owner. A new thread starts with
    no owner, as context variables do; `copy_context().run` and `asyncio.to_thread`
    carry it along."""
    celery = celery_of(srv)
    both_inside = threading.Barrier(2, timeout=10)

    def request(tenant: str, sub: str) -> str:
        celery.set_current()
        with jobwire.owner(tenant, sub):
            both_inside.wait()
            job = celery.tasks["plain_sum"].delay([1]).id
            both_inside.wait()  # neither leaves its block before both have published
        return job

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        acme = pool.submit(request, "acme", "alice")
        globex = pool.submit(request, "globex", "bob")
        jobs = {acme.result(): ("acme", "alice"), globex.result(): ("globex", "bob")}
    assert {j: owner_in_redis(rclient, srv, j) for j in jobs} == jobs

    def publish() -> str:
        celery.set_current()
        return str(celery.tasks["plain_sum"].delay([1]).id)

    with jobwire.owner("acme", "alice"):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fresh = pool.submit(publish).result()  # a new thread: an empty context
            carried = pool.submit(contextvars.copy_context().run, publish).result()
        to_thread = await asyncio.to_thread(publish)
        in_task = await asyncio.create_task(asyncio.to_thread(publish))
    owners = {j: owner_in_redis(rclient, srv, j) for j in (fresh, carried, to_thread, in_task)}
    assert owners == {
        fresh: None,
        carried: ("acme", "alice"),
        to_thread: ("acme", "alice"),
        in_task: ("acme", "alice"),
    }


def test_a_wrong_owner_is_refused_at_once() -> None:
    for tenant, sub in [("", "alice"), (None, "alice"), (42, "alice"), ("acme", None)]:
        with pytest.raises(ValueError, match="must be"):
            jobwire.owner(tenant, sub)  # type: ignore[arg-type]
    assert current_owner() is None


def test_import_jobwire_stays_light() -> None:
    """`import jobwire` and its owner block import neither Celery nor the server; minting a
    token does not import the server either."""
    code = (
        "import sys, jobwire\n"
        "with jobwire.owner('acme', 'alice'): pass\n"
        "assert callable(jobwire.owner), jobwire.owner\n"
        "heavy = {'celery', 'kombu', 'starlette', 'jobwire.server', 'jobwire.tasks'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "import jobwire.owner\n"
        "assert callable(jobwire.owner), 'the submodule shadowed jobwire.owner()'\n"
        "jobwire.mint_token('alice', 'acme', secret='s' * 32, audience='')\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- attach(app, owner=...) ---------------------------------------------------------------

#: What a web framework's request context would hold: the signed-in user.
signed_in: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("signed_in", default=None)


@pytest.fixture
def derived_app(srv: RunningServer) -> Celery:
    """An app of this process attached with an owner callable (the session worker runs
    its tasks: same broker, same task names)."""
    app = create_demo_app(srv.services.settings)
    jobwire.attach(app, srv.services.settings, owner=signed_in.get)
    app.set_current()
    return app


async def test_attach_owner_derives_the_owner_at_publish_time(
    srv: RunningServer, derived_app: Celery, rclient: redis.Redis
) -> None:
    publish = derived_app.tasks["plain_sum"].delay
    none_signed_in = publish([1]).id
    token_ = signed_in.set(("acme", "alice"))
    try:
        derived = publish([2]).id
        with jobwire.owner("globex", "bob"):  # a block is more specific than the app's rule
            blocked = publish([3]).id
        explicit = derived_app.tasks["plain_sum"].apply_async(([4],), headers={TENANT_HEADER: "initech"}).id
    finally:
        signed_in.reset(token_)
    owners = {j: owner_in_redis(rclient, srv, j) for j in (none_signed_in, derived, blocked, explicit)}
    assert owners == {
        none_signed_in: None,
        derived: ("acme", "alice"),
        blocked: ("globex", "bob"),
        explicit: ("initech", ""),
    }
    assert (await status(srv, ACME, derived)).status_code == 200


@pytest.mark.parametrize(
    "answer", [lambda: ("acme",), lambda: "acme", lambda: ("", "x"), lambda: 1 / 0], ids=str
)
async def test_a_failing_owner_callable_leaves_the_job_ownerless(
    srv: RunningServer,
    rclient: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    answer: Callable[[], Any],
) -> None:
    """The publish and the job's PENDING go ahead; the log says what the callable did."""
    app = create_demo_app(srv.services.settings)
    jobwire.attach(app, srv.services.settings, owner=answer)
    app.set_current()
    with caplog.at_level(logging.ERROR, logger="jobwire.tasks.signals"):
        job = app.tasks["plain_sum"].delay([1]).id
    assert (await status(srv, ADMIN, job)).json()["status"] in ("PENDING", "STARTED", "SUCCESS")
    assert owner_in_redis(rclient, srv, job) is None
    assert "the owner callable" in caplog.text and "has no owner" in caplog.text


def test_attach_refuses_an_owner_that_is_not_callable(settings: Settings) -> None:
    app = create_demo_app(settings)
    with pytest.raises(jobwire.AttachError, match="owner must be a callable"):
        jobwire.attach(app, settings, owner=("acme", "alice"))  # type: ignore[arg-type]


# -- mint_token() -------------------------------------------------------------------------


async def test_minted_tokens_are_accepted_by_the_server(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    celery = celery_of(srv)
    with jobwire.owner("acme", "alice"):
        job, sibling = (celery.tasks["plain_sum"].delay([n]).id for n in (1, 2))
    monkeypatch.setenv("JOBWIRE_JWT_SECRET", SECRET)
    monkeypatch.setenv("JOBWIRE_JWT_AUDIENCE", AUDIENCE)
    from_env = jobwire.mint_token("alice", "acme")  # secret and audience from the environment
    assert jwt.decode(from_env, SECRET, ["HS256"], audience=AUDIENCE)["tenant"] == "acme"
    from_settings = mint_token("alice", "acme", settings=srv.services.settings)
    given = mint_token("alice", "acme", secret=SECRET, audience=AUDIENCE, claims={"name": "Alice"})
    for tok in (from_env, from_settings, given):
        assert (await status(srv, tok, job)).status_code == 200
    other = mint_token("bob", "globex")
    assert (await status(srv, other, job)).status_code == 404
    # jobs= narrows a token to those jobs; admin= reaches admin endpoints.
    narrow = mint_token("alice", "acme", jobs=[job])
    assert [(await status(srv, narrow, j)).status_code for j in (job, sibling)] == [200, 404]
    admin = mint_token("root", admin=True)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        for tok, code in ((admin, 200), (from_env, 403)):
            assert (await http.get("/api/v1/admin/rate-limits", headers=bearer(tok))).status_code == code
    assert (await status(srv, admin, sibling)).status_code == 200


async def test_a_wrong_secret_or_an_expired_minted_token_is_refused(srv: RunningServer) -> None:
    celery = celery_of(srv)
    with jobwire.owner("acme", "alice"):
        job = celery.tasks["plain_sum"].delay([1]).id
    forged = mint_token("alice", "acme", secret="not-the-servers-secret-0123456789", audience=AUDIENCE)
    resp = await status(srv, forged, job)
    assert resp.status_code == 401 and resp.json()["error"]["message"] == "invalid token: bad signature"
    short = mint_token("alice", "acme", secret=SECRET, audience=AUDIENCE, ttl=1)
    assert (await status(srv, short, job)).status_code == 200
    # Past `exp` (and the server's 5 s of leeway for clock skew) it is refused.
    await wait_until(
        lambda: status_is(srv, short, job, 401), what="the minted token expires", timeout=15, interval=0.5
    )
    assert (await status(srv, short, job)).json()["error"]["message"] == "invalid token: it has expired"


async def status_is(srv: RunningServer, tok: str, job_id: str, code: int) -> bool:
    return (await status(srv, tok, job_id)).status_code == code


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (dict(sub=""), "sub must be a non-empty string"),
        (dict(sub=7), "sub must be a non-empty string"),
        (dict(tenant=""), "tenant must be a non-empty string or None"),
        (dict(tenant=None), "tenant is required"),
        (dict(ttl=0), "ttl must be a positive number"),
        (dict(ttl=float("inf")), "ttl must be a positive number"),
        (dict(ttl="60"), "ttl must be a positive number"),
        (dict(admin="yes"), "admin must be True or False"),
        (dict(jobs="job-1"), "not one string"),
        (dict(jobs=[]), "non-empty list of job ids"),
        (dict(jobs=[1]), "non-empty list of job ids"),
        (dict(claims={"tenant": "other"}), "claims may not set ['tenant']"),
        (dict(secret=""), "no secret to sign with"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_mint_token_says_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], says: str
) -> None:
    monkeypatch.setenv("JOBWIRE_JWT_SECRET", SECRET)
    args = {"sub": "alice", "tenant": "acme", **kwargs}
    with pytest.raises(TokenError) as raised:
        mint_token(args.pop("sub"), **args)
    assert says in str(raised.value)


def test_mint_token_without_a_secret_says_where_one_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBWIRE_JWT_SECRET", raising=False)
    with pytest.raises(TokenError, match="set JOBWIRE_JWT_SECRET"):
        mint_token("alice", "acme")
    monkeypatch.setenv("JOBWIRE_TENANCY", "single")  # a tenantless token is fine there ...
    with pytest.raises(TokenError, match="set JOBWIRE_JWT_SECRET"):  # ... and still needs a secret
        mint_token("alice")
    assert jwt.decode(mint_token("alice", secret=SECRET, audience=""), SECRET, ["HS256"])["sub"] == "alice"


# -- single-tenant mode -------------------------------------------------------------------


async def test_single_tenant_a_token_without_tenant_sees_every_job(single: RunningServer) -> None:
    """JOBWIRE_TENANCY=single: a plain `.delay()` job (no owner) is read, watched and listed
    by a token with no tenant, and so is a job some tenant owns; its link tokens still
    narrow to their job, and admin endpoints still need the admin scope."""
    celery = celery_of(single)
    plain = celery.tasks["long_running_task"].delay(delay=0.05).id
    with jobwire.owner("acme", "alice"):
        owned = celery.tasks["plain_sum"].delay([1]).id
    for tok in (NO_TENANT, GLOBEX, mint_token("dave", settings=single.services.settings)):
        assert await visible(single, tok, plain, owned) == {plain: True, owned: True}
    assert (await status(single, NO_TENANT, plain)).json()["task"] == "long_running_task"
    events = await watch_until_final(single, NO_TENANT, plain)
    assert [e["state"] for e in events][-1] == "SUCCESS"
    async with httpx.AsyncClient(base_url=single.url, headers=bearer(NO_TENANT)) as http:
        listed = [j["job_id"] for j in (await http.get("/api/v1/jobs", params={"limit": 200})).json()["jobs"]]
        assert {plain, owned} <= set(listed)
        assert (await http.get("/api/v1/admin/rate-limits")).status_code == 403
        link = (await http.post(f"/api/v1/jobs/{plain}/token")).json()["token"]
    assert await visible(single, link, plain, owned) == {plain: True, owned: False}
    assert await ws_refused(single, link, owned) == (4404, "job not found")
    async with httpx.AsyncClient(base_url=single.url, headers=bearer(ADMIN)) as http:
        assert (await http.get("/api/v1/admin/rate-limits")).status_code == 200


async def test_single_tenant_all_jobs_stream_carries_ownerless_jobs(single: RunningServer) -> None:
    celery = celery_of(single)

    async def until(ws: Any, done: Callable[[dict[str, Any]], bool]) -> None:
        while not done(json.loads(await ws.recv())):
            pass

    async with websockets.connect(f"{single.ws_url}/ws", additional_headers=bearer(NO_TENANT)) as ws:
        await ws.send(json.dumps({"op": "subscribe_all"}))
        await asyncio.wait_for(until(ws, lambda m: m["type"] == "subscribed_all"), 10)
        job = celery.tasks["plain_sum"].delay([1]).id
        final = lambda m: m["type"] == "event" and m["job_id"] == job and m["final"]  # noqa: E731
        await asyncio.wait_for(until(ws, final), 15)


async def test_multi_tenant_still_refuses_a_token_without_tenant(srv: RunningServer) -> None:
    celery = celery_of(srv)
    job = celery.tasks["plain_sum"].delay([1]).id
    resp = await status(srv, NO_TENANT, job)
    assert resp.status_code == 401
    assert "`tenant` is required" in resp.json()["error"]["message"]
    with pytest.raises(TokenError, match="tenant is required"):
        mint_token("carol", settings=srv.services.settings)


def test_tenancy_setting_is_checked() -> None:
    assert Settings().tenancy == "multi"
    assert Settings(tenancy="single").tenancy == "single"
    with pytest.raises(SettingsError, match="JOBWIRE_TENANCY"):
        Settings.from_env(tenancy="one")
