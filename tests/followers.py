"""Clients that behave as real ones do through an outage: they reconnect and resume from the
last seq they had (websocket `since`, SSE `Last-Event-ID`, `watch()`), or keep polling. Each
records what it received and when, so a failover test can say when events flowed again."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from jobwire.client import watch
from tests.clients import sse_blocks

#: A client's pause before reconnecting (its backoff, as jobwire's own clients have).
RECONNECT = 0.2


@dataclass
class Log:
    """What one client received: events per job with the time each arrived, the
    `unavailable` notices, and every HTTP status it was answered with."""

    name: str
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    arrived: dict[str, list[float]] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)
    statuses: list[tuple[int, str | None]] = field(default_factory=list)  # (status, Retry-After)
    errors: list[str] = field(default_factory=list)  # why a connection ended, when it did

    def add(self, event: dict[str, Any]) -> None:
        job = event["job_id"]
        seen = self.events.setdefault(job, [])
        if seen and event["seq"] <= seen[-1]["seq"]:
            return  # a resumed client may be sent an event again; it keeps the first
        seen.append(event)
        self.arrived.setdefault(job, []).append(time.monotonic())

    def final(self, job: str) -> bool:
        seen = self.events.get(job)
        return bool(seen and seen[-1]["final"])

    def first_after(self, job: str, moment: float) -> float | None:
        """Seconds from `moment` to the first event of `job` that arrived after it."""
        later = [t for t in self.arrived.get(job, []) if t > moment]
        return later[0] - moment if later else None


async def ws_follow(ws_url: str, jobs: list[str], log: Log) -> None:
    """One `/ws` socket for every job, reconnecting with `since` until all are final."""
    while not all(log.final(j) for j in jobs):
        since = {j: log.events[j][-1]["seq"] for j in jobs if log.events.get(j)}
        try:
            async with websockets.connect(f"{ws_url}/ws", open_timeout=5) as ws:
                await ws.send(json.dumps({"op": "subscribe", "job_ids": jobs, "since": since}))
                async for text in ws:
                    msg = json.loads(text)
                    if msg["type"] == "event":
                        log.add(msg)
                        if all(log.final(j) for j in jobs):
                            return
                    elif msg["type"] == "error" and msg.get("code") == "unavailable":
                        log.unavailable.add(msg.get("job_id") or "*")
                    elif msg["type"] == "error":
                        log.errors.append(str(msg))
        except (ConnectionClosed, InvalidStatus, OSError, TimeoutError) as exc:
            log.errors.append(repr(exc))
        await asyncio.sleep(RECONNECT)


async def watch_follow(url: str, job: str, log: Log) -> None:
    async for event in watch(job, url, backoff_min=0.1, backoff_max=1.0):
        log.add({**event})


async def sse_follow(url: str, job: str, log: Log) -> None:
    """`/api/v1/jobs/{id}/events` as EventSource reads it: reconnect with Last-Event-ID."""
    last_id: str | None = None
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5, read=30)) as http:
        while not log.final(job):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with http.stream("GET", f"/api/v1/jobs/{job}/events", headers=headers) as resp:
                    log.statuses.append((resp.status_code, resp.headers.get("retry-after")))
                    if resp.status_code == 200:
                        async for block in sse_blocks(resp):
                            if block.get("event", "message") == "message":
                                log.add(json.loads(block["data"]))
                                last_id = block.get("id", last_id)
                                if log.final(job):
                                    return
                            elif '"unavailable"' in block["data"]:
                                log.unavailable.add(job)
            except httpx.TransportError:
                pass
            await asyncio.sleep(RECONNECT)


async def poll_follow(url: str, job: str, log: Log, every: float = 0.1) -> None:
    """`GET /api/v1/jobs/{id}` until the job is final, keeping every status it got."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while True:
            try:
                resp = await http.get(f"/api/v1/jobs/{job}")
            except httpx.TransportError:
                await asyncio.sleep(every)
                continue
            log.statuses.append((resp.status_code, resp.headers.get("retry-after")))
            if resp.status_code == 200:
                body = resp.json()
                log.add({"job_id": job, "seq": body["seq"], "final": body["final"], "state": body["status"]})
                if body["final"]:
                    return
            await asyncio.sleep(every)  # the poller's pace, not a wait on a condition


async def probe(url: str, jobs: list[str], log: Log, stop: asyncio.Event) -> None:
    """Read every job's history and batch status, and readiness, until `stop`: what a
    dashboard and a load balancer ask while the cluster fails over."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while not stop.is_set():
            for path in [f"/api/v1/jobs/{j}/history" for j in jobs] + ["/readyz"]:
                try:
                    resp = await http.get(path)
                except httpx.TransportError:
                    continue
                log.statuses.append((resp.status_code, resp.headers.get("retry-after")))
            try:
                resp = await http.post("/api/v1/jobs/batch-status", json={"job_ids": jobs})
                log.statuses.append((resp.status_code, resp.headers.get("retry-after")))
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)  # the prober's pace


def server_faults(logs: list[Log]) -> list[tuple[str, int, str | None]]:
    """Every 5xx answered, except a 503 that says when to retry."""
    return [
        (log.name, status, retry)
        for log in logs
        for status, retry in log.statuses
        if status >= 500 and not (status == 503 and retry)
    ]
