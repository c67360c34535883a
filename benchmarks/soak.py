"""Soak: thousands of websocket clients over two server processes, Redis restarted midway.

    python -m benchmarks.soak [--clients 2000] [--jobs 500] [--seconds 180] [--rate 250]

Two `jobwire serve` processes share one Redis with no persistence. Clients (jobwire's own
Python `watch()`, half on each server) each follow one job from PENDING to SUCCESS, while
a publisher thread records every job's lifecycle round-robin (PENDING, STARTED, WORKING
progress, UPLOADING progress, SUCCESS). Halfway through, Redis is SIGKILLed and started
again empty: job records come back under new epochs as the publisher's writes resume.

Checked: every client sees every transition of its job, in order, and the final event;
the servers log no error. Reported: server RSS per idle connection, CPU, deliveries,
resets, and what `/metrics` counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.procs import cpu_seconds, rss_kib, wait_ready
from jobwire.client import watch
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import ROOT, free_port, redis_server


def lifecycle(steps: int) -> list[tuple[str, dict[str, Any] | None]]:
    """One job's events: (state, progress), `steps` of them in all."""
    working, uploading = int(steps * 0.8), steps - int(steps * 0.8) - 3
    return (
        [("PENDING", None), ("STARTED", None)]
        + [("WORKING", {"step": i, "total": working}) for i in range(working)]
        + [("UPLOADING", {"step": i, "total": uploading}) for i in range(uploading)]
        + [("SUCCESS", None)]
    )


def transitions(states: list[str]) -> list[str]:
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


@dataclass
class Publisher:
    recorder: Recorder
    jobs: list[str]
    steps: int
    rate: float
    written: int = 0
    started: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        plan = lifecycle(self.steps)[1:]  # PENDING is written before the clients connect
        self.started.set()
        next_at = time.perf_counter()
        for state, progress in plan:
            for job_id in self.jobs:
                if state == "SUCCESS":
                    self.recorder.record(job_id, state, result={"ok": True})
                else:
                    self.recorder.record(job_id, state, progress=progress)
                self.written += 1
                next_at += 1 / self.rate
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)


async def follow(url: str, job_id: str, seen: dict[str, list[str]], resets: list[int]) -> None:
    states: list[str] = []
    epoch = None
    async for event in watch(job_id, url, backoff_max=2.0, lost_grace=120.0):
        if epoch is not None and event.get("epoch") != epoch:
            resets.append(1)
        epoch = event.get("epoch")
        states.append(event["state"])
    seen[job_id + "#" + str(id(states))] = states


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "jobwire.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


async def run(clients: int, jobs: int, seconds: float, rate: float) -> None:
    steps = max(10, int(rate * seconds / jobs))
    logs = Path(tempfile.mkdtemp(prefix="jobwire-soak-"))
    with redis_server() as redis:
        env = {
            **os.environ,
            "JOBWIRE_REDIS_URL": redis.url,
            "JOBWIRE_MAX_CONNECTIONS_PER_ADDRESS": "100000",
            "JOBWIRE_NEW_CONNECTIONS_PER_SECOND": "100000",
        }
        ports = [free_port(), free_port()]
        servers = [start_server(p, env, logs / f"server-{p}.log") for p in ports]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        try:
            for url in urls:
                wait_ready(f"{url}/readyz")
            await asyncio.sleep(1.0)
            idle_rss = [rss_kib(s.pid) for s in servers]
            settings = Settings(redis_url=redis.url, record_retry_seconds=60)
            recorder = Recorder(redis.client(), settings)
            job_ids = [f"soak-{i}" for i in range(jobs)]
            for job_id in job_ids:
                recorder.record(job_id, "PENDING")
            seen: dict[str, list[str]] = {}
            resets: list[int] = []
            followers = [
                asyncio.create_task(follow(urls[i % 2], job_ids[i % jobs], seen, resets))
                for i in range(clients)
            ]
            target = clients // 2

            def connected() -> float:
                return min(metric(u, "jobwire_connections") for u in urls)

            while connected() < target:
                await asyncio.sleep(0.5)
            await asyncio.sleep(2.0)
            loaded_rss = [rss_kib(s.pid) for s in servers]
            cpu0 = [cpu_seconds(s.pid) for s in servers]
            publisher = Publisher(recorder, job_ids, steps, rate)
            publisher_thread = threading.Thread(target=publisher.run, daemon=True)
            t0 = time.perf_counter()
            publisher_thread.start()
            await asyncio.sleep(seconds / 2)
            redis.stop()  # SIGKILL: everything in it is gone
            await asyncio.sleep(1.0)
            redis.start()
            restarted_at = time.perf_counter() - t0
            await asyncio.to_thread(publisher_thread.join)
            await asyncio.wait_for(asyncio.gather(*followers), 180)
            wall = time.perf_counter() - t0
            cpu = [cpu_seconds(s.pid) - c for s, c in zip(servers, cpu0, strict=True)]
            end_rss = [rss_kib(s.pid) for s in servers]
            counted = {
                name: sum(metric(u, name) for u in urls)
                for name in (
                    "jobwire_deliveries_total",
                    "jobwire_coalesced_events_total",
                    "jobwire_slow_clients_closed_total",
                    "jobwire_hub_reconnects",
                )
            }
        finally:
            for s in servers:
                s.terminate()
                s.wait()

    expected = transitions([s for s, _ in lifecycle(steps)])
    complete = sum(1 for states in seen.values() if transitions(states) == expected)
    texts = [log.read_text() for log in logs.iterdir()]
    errors = sum(text.count("ERROR") + text.count("Traceback") for text in texts)
    per_conn = [(loaded - idle) / (clients / 2) for loaded, idle in zip(loaded_rss, idle_rss, strict=True)]
    table = Table(title=f"soak: {clients} clients, {jobs} jobs, 2 servers, {wall:.0f} s, Redis restarted")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("clients with every transition and the final event", f"{complete} of {clients}")
    table.add_row("clients that saw a reset (new epoch)", f"{len(resets):,}")
    table.add_row("server errors logged", str(errors))
    table.add_row("events written", f"{publisher.written + jobs:,} ({steps} per job)")
    table.add_row("Redis restarted at", f"{restarted_at:.0f} s")
    table.add_row("server RSS idle (each)", " / ".join(f"{r / 1024:.0f} MiB" for r in idle_rss))
    table.add_row("server RSS with clients (each)", " / ".join(f"{r / 1024:.0f} MiB" for r in loaded_rss))
    table.add_row("server RSS at the end (each)", " / ".join(f"{r / 1024:.0f} MiB" for r in end_rss))
    table.add_row("memory per connection", " / ".join(f"{k:.1f} KiB" for k in per_conn))
    table.add_row("server CPU (each)", " / ".join(f"{c / wall:.0%}" for c in cpu))
    for name, value in counted.items():
        table.add_row(name, f"{value:,.0f}")
    Console().print(table)
    if complete != clients or errors:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--rate", type=float, default=250.0, help="events per second, all jobs together")
    args = p.parse_args()
    asyncio.run(run(args.clients, args.jobs, args.seconds, args.rate))


if __name__ == "__main__":
    main()
