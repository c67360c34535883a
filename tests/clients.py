"""Small test clients speaking jobwire's protocols over real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import websockets

LIFECYCLE = ["PENDING", "STARTED", "VALIDATING", "PROCESSING", "UPLOADING", "SUCCESS"]


async def submit(base_url: str, task: str = "long_running_task", **kwargs: Any) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        resp = await http.post("/api/v1/jobs", json={"task": task, "kwargs": kwargs})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["job_id"])


async def recv_json(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))  # type: ignore[no-any-return]


async def next_of(ws: Any, *types: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next message of one of `types`, skipping heartbeats and the like."""
    while True:
        msg = await recv_json(ws, timeout)
        if msg["type"] in types:
            return msg


async def until_subscribed(ws: Any, job_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Read up to the `subscribed` ack for `job_id`; return the (replayed) events before it."""
    events: list[dict[str, Any]] = []
    while True:
        msg = await next_of(ws, "event", "subscribed", "error", timeout=timeout)
        assert msg["type"] != "error", msg
        if msg["type"] == "subscribed" and msg["job_id"] == job_id:
            return events
        if msg["type"] == "event" and msg["job_id"] == job_id:
            events.append(msg)


async def events_until_final(
    ws: Any, job_id: str, timeout: float = 20.0, events: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Every event for `job_id` on a /ws socket until the final one (after `events`)."""
    events = list(events or [])
    if events and events[-1]["final"]:
        return events
    while True:
        msg = await next_of(ws, "event", "error", timeout=timeout)
        assert msg["type"] == "event", msg
        if msg["job_id"] == job_id:
            events.append(msg)
            if msg["final"]:
                return events


async def watch_ws(ws_url: str, job_id: str, since: int | None = None) -> list[dict[str, Any]]:
    async with websockets.connect(f"{ws_url}/ws") as ws:
        sub: dict[str, Any] = {"op": "subscribe", "job_ids": [job_id]}
        if since is not None:
            sub["since"] = {job_id: since}
        await ws.send(json.dumps(sub))
        return await events_until_final(ws, job_id)


def assert_gap_free(events: list[dict[str, Any]], first: int = 1) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(first, first + len(events))), seqs


async def events_until_state(
    ws: Any, job_id: str, state: str, events: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Read `job_id`'s events (after `events`) until one in `state` has arrived."""
    events = list(events)
    while not any(e["state"] == state for e in events):
        msg = await next_of(ws, "event")
        if msg["job_id"] == job_id:
            events.append(msg)
    return events
