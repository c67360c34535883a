"""Fan-out: N websocket clients on one job, M events; latency and server CPU per delivery.

    python -m benchmarks.fanout [--clients 200] [--events 500] [--rate 250]

The server runs as its own uvicorn process so its CPU time can be read from /proc; events
are written with the real record script at a fixed rate; latency is the time from the
worker-side `ts` to the client receiving the frame (same machine, same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import orjson
import websockets
from rich.console import Console
from rich.table import Table

from benchmarks.procs import cpu_seconds, wait_ready
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import ROOT, free_port, redis_server


async def client(url: str, job_id: str, expect: int, latencies: list[float]) -> int:
    got = 0
    async with websockets.connect(f"{url}/ws", max_queue=None) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "job_ids": [job_id]}).decode())
        last = 0
        async for frame in ws:
            now = time.time()
            msg = orjson.loads(frame)
            if msg.get("type") != "event":
                continue
            # In order, with no gap but the progress a server behind coalesced (and says so).
            assert msg["seq"] == last + 1 + msg.get("coalesced", 0), "out of order or gap"
            last = msg["seq"]
            if msg["state"] == "WORKING":
                latencies.append(now - msg["ts"])
            got += 1
            if msg["final"]:
                return got
    return got


async def run(clients: int, events: int, rate: float) -> None:
    with redis_server() as redis:
        settings = Settings(redis_url=redis.url, history_limit=events + 10)
        port = free_port()
        # One address opens every client: lift the per-address limit for the benchmark.
        env = {
            **os.environ,
            "JOBWIRE_REDIS_URL": redis.url,
            "JOBWIRE_MAX_CONNECTIONS_PER_ADDRESS": "100000",
            "JOBWIRE_NEW_CONNECTIONS_PER_SECOND": "100000",
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "jobwire.server.app:create_app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--ws-per-message-deflate",
                "false",
            ],
            cwd=ROOT,
            env=env,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz")
            recorder = Recorder(redis.client(), settings)
            job_id = "bench"
            recorder.record(job_id, "PENDING")
            latencies: list[float] = []
            tasks = [
                asyncio.create_task(client(f"ws://127.0.0.1:{port}", job_id, events + 2, latencies))
                for _ in range(clients)
            ]
            await asyncio.sleep(1.0)  # let every client subscribe
            cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
            for i in range(events):
                recorder.record(job_id, "WORKING", progress={"step": i + 1, "total": events})
                await asyncio.sleep(1 / rate)
            recorder.record(job_id, "SUCCESS", result=None)
            counts = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            wall, cpu = time.perf_counter() - t0, cpu_seconds(server.pid) - cpu0
        finally:
            server.terminate()
            server.wait()

    deliveries = clients * (events + 1)
    lat = sorted(latencies)
    table = Table(title=f"fan-out: {clients} clients x {events} events at {rate:.0f}/s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("events delivered (all in order)", f"{sum(counts) - clients:,} of {deliveries:,}")
    table.add_row("server CPU per delivery", f"{cpu / deliveries * 1e6:.1f} µs")
    table.add_row("server CPU utilisation", f"{cpu / wall:.0%} of one core")
    table.add_row("latency p50", f"{statistics.median(lat) * 1e3:.2f} ms")
    table.add_row("latency p99", f"{lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
    table.add_row("latency max", f"{lat[-1] * 1e3:.2f} ms")
    Console().print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--events", type=int, default=500)
    p.add_argument("--rate", type=float, default=250.0, help="events per second")
    args = p.parse_args()
    asyncio.run(run(args.clients, args.events, args.rate))


if __name__ == "__main__":
    main()
