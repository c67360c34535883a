"""Refusals for load say "later", and every client comes back; refusals for good stay final.

Behind a reverse proxy every client shares one address, so per-address limits bite there
first. A refused websocket gets HTTP 429 with `Retry-After` before the upgrade (never the
403 of an Origin refusal), an SSE stream the same, and `watch()` retries it; proxies are
believed (X-Forwarded-For) only when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis
import websockets
from websockets.exceptions import InvalidStatus

from jobwire.client import Jobwire, JobwireError, watch
from jobwire.tasks.recorder import Owner, Recorder
from tests.clients import assert_gap_free, recv_json, transitions
from tests.support import (
    RedisServer,
    RunningServer,
    free_port,
    run_server,
    settings_for,
    until_serving,
    wait_until,
)
from tests.test_auth import AUDIENCE, SECRET, bearer, token

PROXY_HOST = "127.0.0.2"  # another loopback address: the proxy's, as the server sees it


class Proxy:
    """A reverse proxy stand-in on `PROXY_HOST`: it adds `X-Forwarded-For: <client>` to
    each request head (as nginx's `$proxy_add_x_forwarded_for` does), connects to the
    server from `PROXY_HOST`, and relays bytes both ways. A server that is down (a
    restart) closes the client's connection, as a proxy's 502 would end it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{PROXY_HOST}:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._relay, PROXY_HOST, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[0]
        self.writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port, local_addr=(PROXY_HOST, 0)
            )
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        line, _, rest = head.partition(b"\r\n")
        up_writer.write(line + b"\r\nX-Forwarded-For: " + client.encode() + b"\r\n" + rest)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.writers.discard(writer)


async def _follow(job_id: str, url: str, token: str | None = None) -> list[dict[str, Any]]:
    return [event async for event in watch(job_id, url, token=token)]


@contextlib.asynccontextmanager
async def _proxy_or_none(port: int, via_proxy: bool) -> AsyncIterator[str]:
    if not via_proxy:
        yield f"http://127.0.0.1:{port}"
        return
    async with Proxy(port) as proxy:
        yield proxy.url


JOBS, WATCHERS, LIMIT = 10, 300, 40


@pytest.mark.parametrize("via_proxy", [False, True], ids=["direct", "proxy"])
async def test_300_watchers_through_one_address_all_finish_through_a_restart(
    own_redis: RedisServer, via_proxy: bool
) -> None:
    """300 `watch()` clients from one address against a limit of 40 per address, directly
    or through a trusted proxy that says who they are: the rest are refused with 429 and
    retry. The server restarts gracefully (1001) in the middle. 300 of 300 reach SUCCESS,
    each with every transition in order."""
    settings = settings_for(
        own_redis.url,
        max_connections_per_address=LIMIT,
        forwarded_allow_ips=(PROXY_HOST,) if via_proxy else (),
    )
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    jobs = [f"crowd-{via_proxy}-{i}" for i in range(JOBS)]
    for job_id in jobs:
        recorder.record(job_id, "PENDING")
    port = free_port()
    async with _proxy_or_none(port, via_proxy) as url:
        async with run_server(settings, port) as srv:
            watchers = [asyncio.create_task(_follow(jobs[i % JOBS], url)) for i in range(WATCHERS)]
            addresses = srv.services.connections._addresses
            await wait_until(
                lambda: addresses.get("127.0.0.1") == LIMIT and _refused(srv) >= WATCHERS - LIMIT,
                what=f"{LIMIT} watchers in, each of the others refused",
                timeout=30,
            )
            # Through the proxy, the client's address is the one counted, not the proxy's.
            assert PROXY_HOST not in addresses
            for job_id in jobs:
                recorder.record(job_id, "WORKING", progress={"step": 1})
        # Gone away (1001 to every socket) and back; the jobs went on meanwhile.
        for job_id in jobs:
            recorder.record(job_id, "WORKING", progress={"step": 2})
        async with run_server(settings, port) as srv:
            for job_id in jobs:
                recorder.record(job_id, "SUCCESS", result=job_id)
            results = await asyncio.wait_for(asyncio.gather(*watchers), 50)
    assert [events[-1]["state"] for events in results].count("SUCCESS") == WATCHERS
    for events in results:
        assert transitions(events) == ["PENDING", "WORKING", "SUCCESS"]
        assert_gap_free(events)


def _refused(srv: RunningServer, reason: str = "address") -> float:
    return float(srv.services.metrics.rejected.labels(reason)._value.get())


async def test_load_refusals_are_429_with_retry_after_and_counted(own_redis: RedisServer) -> None:
    """Over the per-address limit or its pace, a websocket upgrade and an SSE stream both get
    429 with `Retry-After` and the JSON error, counted by reason; an Origin refusal is
    still the final 403."""
    settings = settings_for(own_redis.url, max_connections_per_address=2, allowed_origins=())
    async with run_server(settings) as srv:
        held = [await websockets.connect(f"{srv.ws_url}/ws") for _ in range(2)]
        try:
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(f"{srv.ws_url}/ws")
            response = refused.value.response
            assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
            assert json.loads(response.body)["error"]["code"] == "too_many_connections"
            async with httpx.AsyncClient(base_url=srv.url) as http:
                sse = await http.get("/api/v1/events", params={"job": "x"})
            assert sse.status_code == 429 and int(sse.headers["Retry-After"]) >= 1
            assert sse.json()["error"]["code"] == "too_many_connections"
            assert _refused(srv) == 2
            with pytest.raises(InvalidStatus) as forbidden:
                await websockets.connect(f"{srv.ws_url}/ws", origin="https://elsewhere.example")
            assert forbidden.value.response.status_code == 403
        finally:
            for ws in held:
                await ws.close()
    async with run_server(settings.model_copy(update=dict(new_connections_per_second=1.0))) as srv:
        paced = [await websockets.connect(f"{srv.ws_url}/ws") for _ in range(2)]  # the burst: 2 x 1/s
        try:
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(f"{srv.ws_url}/ws")
            assert refused.value.response.status_code == 429
            assert int(refused.value.response.headers["Retry-After"]) >= 1
            assert _refused(srv, "pace") == 1
        finally:
            for ws in paced:
                await ws.close()


@pytest.mark.parametrize("trusted", [(), ("127.0.0.1",)], ids=["default", "trusted"])
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    own_redis: RedisServer, trusted: tuple[str, ...]
) -> None:
    """By default no one's X-Forwarded-For is believed: a local process claiming to be
    another address is still counted as itself. From a trusted proxy, the header names the
    client."""
    settings = settings_for(own_redis.url, max_connections_per_address=1, forwarded_allow_ips=trusted)
    async with run_server(settings) as srv:
        first = await websockets.connect(f"{srv.ws_url}/ws", additional_headers=_from("10.0.0.1"))
        try:
            assert (await recv_json(first))["type"] == "welcome"
            if trusted:
                second = await websockets.connect(f"{srv.ws_url}/ws", additional_headers=_from("10.0.0.2"))
                assert (await recv_json(second))["type"] == "welcome"
                assert set(srv.services.connections._addresses) == {"10.0.0.1", "10.0.0.2"}
                await second.close()
            else:
                with pytest.raises(InvalidStatus) as refused:
                    await websockets.connect(f"{srv.ws_url}/ws", additional_headers=_from("10.0.0.2"))
                assert refused.value.response.status_code == 429
                assert set(srv.services.connections._addresses) == {"127.0.0.1"}
        finally:
            await first.close()


def _from(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def _refusal_times(srv: RunningServer, reason: str, count: int, timeout: float = 15.0) -> list[float]:
    """When the server refused for `reason`, up to `count` refusals (polled every 10 ms)."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    seen = _refused(srv, reason)
    deadline = loop.time() + timeout
    while len(times) < count:
        assert loop.time() < deadline, f"only {len(times)} refusals ({reason}) in {timeout}s"
        now = _refused(srv, reason)
        times += [loop.time()] * int(now - seen)
        seen = now
        await asyncio.sleep(0.01)
    return times


async def test_watch_comes_back_no_sooner_than_retry_after(own_redis: RedisServer) -> None:
    """Refused with 429 and `Retry-After: 2`, `watch()` tries again after 2-3 s, not at its
    own 0.2 s backoff; once a slot is free it follows the job to the end."""
    settings = settings_for(own_redis.url, max_connections_per_address=1)
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    recorder.record("patient", "PENDING")
    recorder.record("patient", "SUCCESS", result=1)
    async with run_server(settings) as srv:
        held = await websockets.connect(f"{srv.ws_url}/ws")
        follow = asyncio.create_task(_follow("patient", srv.url))
        first, second = await _refusal_times(srv, "address", 2)
        await held.close()
        events = await asyncio.wait_for(follow, 10)
    assert 2.0 - 0.05 <= second - first <= 3.5, second - first
    assert [e["state"] for e in events] == ["PENDING", "SUCCESS"]


async def test_watch_backs_off_from_sockets_closed_1013_at_once(own_redis: RedisServer) -> None:
    """A user over their connection limit is accepted, then closed 1013 (the limit is known
    only once the token is): `watch()` waits longer each time, rather than starting its
    backoff again on every socket it was accepted on."""
    settings = settings_for(
        own_redis.url, auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE, max_connections_per_user=1
    )
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    recorder.record("limited", "PENDING", owner=Owner("acme", "alice"))
    recorder.record("limited", "SUCCESS", result=1, owner=Owner("acme", "alice"))
    alice = token("acme", "alice")
    async with run_server(settings) as srv:
        held = await websockets.connect(f"{srv.ws_url}/ws", additional_headers=bearer(alice))
        follow = asyncio.create_task(_follow("limited", srv.url, token=alice))
        times = await _refusal_times(srv, "user", 5)
        await held.close()
        events = await asyncio.wait_for(follow, 10)
    # Delays of 0.2, 0.4, 0.8, 1.6 s, each ×0.5-1.5: the fourth at least 0.8 s.
    assert times[4] - times[3] >= 0.7, [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]
    assert [e["state"] for e in events] == ["PENDING", "SUCCESS"]


@pytest.mark.parametrize("how", ["flag", "variable", "uvicorn's variable", "none"])
async def test_jobwire_serve_believes_the_proxies_it_is_told_of(own_redis: RedisServer, how: str) -> None:
    """`jobwire serve --forwarded-allow-ips`, JOBWIRE_FORWARDED_ALLOW_IPS and uvicorn's own
    FORWARDED_ALLOW_IPS each make the server believe X-Forwarded-For from 127.0.0.1; with
    none of them it believes no one (one connection per address: the second, claiming
    another address, is refused)."""
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("FORWARDED_ALLOW_IPS", "JOBWIRE_FORWARDED_ALLOW_IPS")
    }
    env.update(
        JOBWIRE_REDIS_URL=own_redis.url, JOBWIRE_MAX_CONNECTIONS_PER_ADDRESS="1", JOBWIRE_LOG_LEVEL="warning"
    )
    args = [sys.executable, "-m", "jobwire.cli", "serve", "--port", str(port)]
    if how == "flag":
        args += ["--forwarded-allow-ips", "127.0.0.1"]
    elif how == "variable":
        env["JOBWIRE_FORWARDED_ALLOW_IPS"] = "127.0.0.0/8"
    elif how == "uvicorn's variable":
        env["FORWARDED_ALLOW_IPS"] = "127.0.0.1"
    proc = subprocess.Popen(args, env=env)
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        await until_serving(proc, port)
        async with websockets.connect(url, additional_headers=_from("10.0.0.1")) as first:
            assert (await recv_json(first))["type"] == "welcome"
            if how == "none":
                with pytest.raises(InvalidStatus) as refused:
                    await websockets.connect(url, additional_headers=_from("10.0.0.2"))
                assert refused.value.response.status_code == 429
            else:
                async with websockets.connect(url, additional_headers=_from("10.0.0.2")) as second:
                    assert (await recv_json(second))["type"] == "welcome"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_jobwire_serve_refuses_a_proxy_that_is_no_address() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jobwire.cli", "serve", "--forwarded-allow-ips", "proxy.internal"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    said = " ".join(done.stderr.split())  # the console wraps lines
    assert "JOBWIRE_FORWARDED_ALLOW_IPS has 'proxy.internal', which is no IP address" in said


async def test_rest_refusals_carry_retry_after(own_redis: RedisServer) -> None:
    """The REST client's error for a 429 says when to come back (`retry_after`)."""
    settings = settings_for(own_redis.url, submits_per_minute=1)
    async with run_server(settings) as srv, Jobwire(srv.url) as api:
        await api.submit("plain_sum", [1])
        with pytest.raises(JobwireError) as refused:
            await api.submit("plain_sum", [1])
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.retry_after is not None and 1 <= refused.value.retry_after <= 60
