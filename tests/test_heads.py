"""Oversized request heads are answered at once, with the JSON error: 414 for a long URL,
431 for big headers, on websocket upgrades and plain HTTP alike, and counted with the
other refusals. (A websocket upgrade whose request line passed 8,192 bytes once got no
answer at all; plain HTTP with a 100 KB query got a text/plain 400.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.support import RunningServer

PROMPT = 2.0  # seconds: "at once", with room for a busy machine


async def _upgrade_refused(url: str, **kwargs: object) -> tuple[int, dict[str, str]]:
    """The HTTP status and JSON error a websocket upgrade to `url` is refused with."""
    with pytest.raises(InvalidStatus) as refused:
        await asyncio.wait_for(websockets.connect(url, open_timeout=None, **kwargs), PROMPT)  # type: ignore[arg-type]
    response = refused.value.response
    assert response.headers["content-type"] == "application/json"
    return response.status_code, json.loads(response.body)["error"]


def _refusals(server: RunningServer, reason: str) -> float:
    return float(server.services.metrics.rejected.labels(reason)._value.get())


async def test_long_urls_get_414_on_upgrades_and_plain_http(server: RunningServer) -> None:
    before = _refusals(server, "url_too_long")
    status, error = await _upgrade_refused(f"{server.ws_url}/ws/jobs/x?since=0&pad={'a' * 9000}")
    assert (status, error["code"]) == (414, "url_too_long"), error
    # Raw: httpx itself refuses URLs this long.
    status, body = await _raw(server, f"GET /api/v1/jobs/x?pad={'a' * 100_000} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and body["error"]["code"] == "url_too_long", body
    assert _refusals(server, "url_too_long") == before + 2


async def test_big_headers_get_431_on_upgrades_and_plain_http(server: RunningServer) -> None:
    before = _refusals(server, "headers_too_large")
    # One header line longer than a websocket handshake may have, though under the total.
    status, error = await _upgrade_refused(f"{server.ws_url}/ws", additional_headers={"x-pad": "b" * 9000})
    assert (status, error["code"]) == (431, "headers_too_large"), error
    many = {f"x-h{i}": "1" for i in range(200)}
    status, error = await _upgrade_refused(f"{server.ws_url}/ws", additional_headers=many)
    assert (status, error["code"]) == (431, "headers_too_large"), error
    limit = server.services.settings.max_header_bytes
    async with httpx.AsyncClient(base_url=server.url, timeout=PROMPT) as http:
        resp = await http.get(
            "/api/v1/jobs/x", headers={f"x-h{i}": "c" * 1000 for i in range(limit // 1000 + 1)}
        )
    assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large"
    assert _refusals(server, "headers_too_large") == before + 3


async def test_garbage_gets_the_json_400(server: RunningServer) -> None:
    status, body = await _raw(server, "NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and body["error"]["code"] == "bad_request", body


async def _raw(server: RunningServer, request: str) -> tuple[int, dict[str, Any]]:
    """Send `request` as it is; the answer's status and JSON body (the connection closes)."""
    port = int(server.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode())
        answer = await asyncio.wait_for(reader.read(), PROMPT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


async def test_a_multiplexed_stream_of_200_jobs_fits(server: RunningServer) -> None:
    """The URL limit leaves room for what the browser client sends: 200 jobs on one SSE
    stream, each with its seq and epoch."""
    params = []
    for _ in range(200):
        job_id = str(uuid.uuid4())
        params += [("job", job_id), ("since", f"{job_id}:12345"), ("epoch", f"{job_id}:{uuid.uuid4().hex}")]
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        http.stream("GET", "/api/v1/events", params=params) as resp,
    ):
        assert len(str(resp.url)) > 30_000
        assert resp.status_code == 200
