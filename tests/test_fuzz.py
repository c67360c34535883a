"""Property-based fuzzing of every endpoint, against a real `jobwire serve` process.

Hypothesis throws random paths, query strings, headers, bodies and websocket frames at the
server, with and without a valid token. For every input: no 5xx, every error is a JSON
`{"error": {"code", "message"}}`, every websocket either answers or closes with a code
(never drops), and a stored job stays exactly as it was. The input classes a fuzz pass
once found are pinned as explicit examples, by name. Bounded: a few hundred examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.support import RedisServer, Worker, free_port, wait_until_sync
from tests.test_auth import AUDIENCE, SECRET, token

pytestmark = pytest.mark.timeout(300)

GOOD = token("fuzz", "fuzzer", ttl=86400)  # made at import: it must outlive the run
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


class Server:
    def __init__(self, url: str, job_id: str, keys: list[bytes], snapshot: list[Any]) -> None:
        self.url, self.ws_url, self.job_id, self.keys, self.snapshot = (
            url,
            url.replace("http", "ws"),
            job_id,
            keys,
            snapshot,
        )


@pytest.fixture(scope="module")
def fuzz_server(session_redis: RedisServer, worker: Worker) -> Iterator[Server]:
    port = free_port()
    env = {
        **os.environ,
        "JOBWIRE_REDIS_URL": session_redis.url,
        "JOBWIRE_AUTH": "jwt",
        "JOBWIRE_JWT_SECRET": SECRET,
        "JOBWIRE_JWT_AUDIENCE": AUDIENCE,
        "JOBWIRE_SUBMITS_PER_MINUTE": "100000",
        "JOBWIRE_WS_MESSAGES_PER_SECOND": "100000",
        "JOBWIRE_NEW_CONNECTIONS_PER_SECOND": "100000",  # one address opens a socket per example
        "JOBWIRE_LOG_LEVEL": "warning",
        "JOBWIRE_AUTH_TIMEOUT": "0.5",  # token-less sockets wait this long before 4401
    }
    proc = subprocess.Popen([sys.executable, "-m", "jobwire.cli", "serve", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, "jobwire serve exited"
            try:
                return httpx.get(f"{url}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until_sync(ready, what="jobwire serve is ready", timeout=30)
        auth = {"Authorization": f"Bearer {GOOD}"}
        job_id = httpx.post(
            f"{url}/api/v1/jobs", json={"task": "long_running_task", "kwargs": {"delay": 0}}, headers=auth
        ).json()["job_id"]
        wait_until_sync(
            lambda: httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=auth).json()["final"],
            what="the job ends",
        )
        client = session_redis.client()
        keys = sorted(client.keys(f"*{job_id}*"))
        snapshot = [client.dump(k) for k in keys]
        yield Server(url, job_id, keys, snapshot)
        # Nothing the fuzzer sent changed the stored job.
        assert sorted(client.keys(f"*{job_id}*")) == keys
        assert [client.dump(k) for k in keys] == snapshot
        assert httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=auth).json()["status"] == "SUCCESS"
    finally:
        proc.terminate()
        proc.wait(10)


# -- strategies ---------------------------------------------------------------------------

weird_text = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        ["\u00b2", "9" * 20, "1" * 1000, "-1", "NaN", "inf", "1e400", "{x}", "a:events", "", " ", "%00"]
    ),
    st.from_regex(r"[0-9]{1,30}", fullmatch=True),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
tokens = st.sampled_from(
    [GOOD, GOOD, GOOD, None, "garbage", token("fuzz", "x", secret="another-secret-another-secret-0123")]
)
ENDPOINTS = [
    ("GET", "/api/v1/tasks"),
    ("POST", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs"),
    ("POST", "/api/v1/jobs/batch-status"),
    ("GET", "/api/v1/jobs/{id}"),
    ("DELETE", "/api/v1/jobs/{id}"),
    ("GET", "/api/v1/jobs/{id}/history"),
    ("POST", "/api/v1/jobs/{id}/token"),
    ("GET", "/api/v1/jobs/{id}/events"),
    ("GET", "/api/v1/events"),
    ("GET", "/openapi.json"),
    ("GET", "/celery-progress/{id}/"),
]


def _check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
        body = resp.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body


def _request(
    server: Server, method: str, path: str, params: Any, headers: dict[str, Any], body: bytes | None
) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream(method, path, params=params, headers=headers, content=body) as resp:
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                return  # a live stream: its opening was the input's answer
            resp.read()
            _check(resp)


@FUZZ
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    job_id=weird_text,
    query=st.lists(
        st.tuples(st.sampled_from(["since", "before", "limit", "job", "all", "token", "x"]), weird_text),
        max_size=4,
    ),
    header=st.tuples(st.sampled_from(["last-event-id", "content-type", "origin", "x-any"]), weird_text),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None]),
    body=st.one_of(st.none(), json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)),
    tok=tokens,
)
@example(
    ("GET", "/api/v1/jobs/{id}/history"), "x", [("since", "\u00b2")], ("x-any", ""), None, None, GOOD
).via("unicode digit since")
@example(("GET", "/api/v1/jobs/{id}/events"), "x", [], ("last-event-id", "7" * 5000), None, None, GOOD).via(
    "huge Last-Event-ID"
)
@example(
    ("GET", "/api/v1/events"), "", [("job", "x"), ("since", "x:" + "9" * 30)], ("x-any", ""), None, None, GOOD
).via("huge since")
@example(("GET", "/api/v1/jobs"), "", [("before", "NaN")], ("x-any", ""), None, None, GOOD).via("NaN cursor")
@example(
    ("POST", "/api/v1/jobs"),
    "",
    [],
    ("x-any", ""),
    "application/json",
    b'{"task": "t", "kwargs": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}",
    GOOD,
).via("deep nesting")
@example(
    ("POST", "/api/v1/jobs"), "", [], ("x-any", ""), "text/plain", b'{"task": "long_running_task"}', GOOD
).via("text/plain CSRF")
def test_http_never_5xx(
    fuzz_server: Server,
    endpoint: tuple[str, str],
    job_id: str,
    query: Any,
    header: Any,
    content_type: str | None,
    body: bytes | None,
    tok: str | None,
) -> None:
    method, template = endpoint
    if "{id}" in template:
        job_id = job_id or fuzz_server.job_id
        if method == "DELETE" and job_id == fuzz_server.job_id:
            job_id += "-other"  # revoking a finished job is a 409 anyway; keep the probe pure
        template = template.replace("{id}", quote(job_id, safe="") or "x")
    headers: dict[str, Any] = {}
    name, value = header
    headers[name] = value.encode("utf-8")
    if content_type:
        headers["content-type"] = content_type
    if tok:
        headers["authorization"] = f"Bearer {tok}"
    if method == "POST" and body and b"long_running_task" in body and content_type and "json" in content_type:
        body = body.replace(b"long_running_task", b"not_a_task")  # never queue real work
    try:
        _request(fuzz_server, method, template, query, headers, body if method != "GET" else None)
    except (httpx.InvalidURL, httpx.LocalProtocolError, httpx.UnsupportedProtocol):
        pass  # the client itself would not send it


ops = st.sampled_from(
    ["subscribe", "unsubscribe", "subscribe_all", "unsubscribe_all", "ping", "auth", "nope", ""]
)
frames = st.one_of(
    st.fixed_dictionaries(
        {"op": ops},
        optional={
            "job_ids": st.lists(weird_text, max_size=5) | json_values,
            "since": json_values,
            "token": weird_text,
        },
    ),
    json_values.map(json.dumps),
    st.text(max_size=100),
    st.binary(max_size=100),
)


@FUZZ
@given(messages=st.lists(frames, min_size=1, max_size=5))
@example([{"op": "subscribe", "job_ids": [f"unknown-{i}" for i in range(1000)]}]).via("flood of unknown ids")
@example([{"op": "subscribe", "job_ids": ["x"], "since": {"x": "\u00b2"}}]).via("unicode digit since on /ws")
def test_websocket_frames_get_answers_or_close_codes(fuzz_server: Server, messages: list[Any]) -> None:
    with connect(f"{fuzz_server.ws_url}/ws?token={GOOD}", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        try:
            for message in messages:
                ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
            ws.send(json.dumps({"op": "ping"}))
            while json.loads(ws.recv(timeout=10)).get("type") != "pong":
                pass  # replies, errors, events: the socket is alive and answering
        except ConnectionClosed:
            assert ws.close_code is not None and ws.close_code != 1006, ws.close_code


@FUZZ
@given(job_id=weird_text, since=weird_text, tok=tokens)
def test_single_job_socket_always_closes_with_a_code(
    fuzz_server: Server, job_id: str, since: str, tok: str | None
) -> None:
    path = quote(job_id, safe="") or "x"
    query = httpx.QueryParams({"since": since, **({"token": tok} if tok else {})})
    try:
        with connect(f"{fuzz_server.ws_url}/ws/jobs/{path}?{query}", open_timeout=10) as ws:
            try:
                while True:
                    ws.recv(timeout=10)
            except ConnectionClosed:
                pass
    except InvalidStatus as refused:  # no such route (an id of '/'): a refusal, not a drop
        assert 400 <= refused.response.status_code < 500
        return
    except (ValueError, OSError):
        return  # not a URL a client can send
    assert ws.close_code in {1000, 4400, 4401, 4404}, (ws.close_code, ws.close_reason)
