"""Small test clients speaking jobwire's protocols over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
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


async def ws_job_events(
    url: str, *, frames_per_second: float | None = None, max_queue: int | None = 16
) -> list[dict[str, Any]]:
    """Every event on a /ws/jobs/{id} socket until the server closes it, read at most
    `frames_per_second` (None: as fast as it can; a slower pace makes a slow client)."""
    events = []
    async with websockets.connect(url, max_queue=max_queue) as ws:
        async for text in ws:
            msg = json.loads(text)
            if msg["type"] == "event":
                events.append(msg)
            if frames_per_second:
                await asyncio.sleep(1 / frames_per_second)  # the reader's pace, not a wait
    return events


async def sse_blocks(resp: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """An SSE response's messages, each as its fields (`event`, `id`, `data`)."""
    fields: dict[str, str] = {}
    async for line in resp.aiter_lines():
        if not line:
            if "data" in fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def watch_ws(ws_url: str, job_id: str, since: int | None = None) -> list[dict[str, Any]]:
    async with websockets.connect(f"{ws_url}/ws") as ws:
        sub: dict[str, Any] = {"op": "subscribe", "job_ids": [job_id]}
        if since is not None:
            sub["since"] = {job_id: since}
        await ws.send(json.dumps(sub))
        return await events_until_final(ws, job_id)


def transitions(events: list[dict[str, Any]]) -> list[str]:
    """The states a client saw, with runs of the same state (progress) as one."""
    return [e["state"] for i, e in enumerate(events) if i == 0 or events[i - 1]["state"] != e["state"]]


def assert_gap_free(events: list[dict[str, Any]], first: int = 1) -> None:
    """Every seq from `first` on is accounted for: delivered, or coalesced into the next
    event delivered (`coalesced: n` stands for the n events before it)."""
    expected = first
    for event in events:
        expected += event.get("coalesced", 0)
        assert event["seq"] == expected, [(e["seq"], e.get("coalesced", 0)) for e in events]
        expected += 1


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
