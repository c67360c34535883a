"""Abuse: does one hostile client hurt everyone else?

    python -m benchmarks.abuse [--clients 50] [--seconds 8] [--flooders 20] [--phases quiet,subscribe]

A jobwire server process (`jobwire serve`, defaults but for the demo's settings) serves
`--clients` healthy websockets watching one job that gets 100 events a second, written
with the real record script; each also sends `{"op": "ping"}` five times a second. Their
publish → receive latency, and their ping → pong round trip, are measured in phases of
`--seconds` each, in one run:

1. quiet;
2. `--flooders` sockets (20) flooding `subscribe` messages of 1,000 unknown ids each, as
   fast as they can, until the server closes them;
3. one address opening 2,000 sockets as fast as it can;
4. control: the same flood aimed at a second, idle jobwire process on this machine, which
   shows how much of phase 3 is the machine (2 cores shared by server, clients, Redis and
   the abuser) rather than the server the healthy clients use;
5. (`--phases quiet,subscribe,subscribe-control`) the same for phase 2's flood.

Abusers run in a process of their own (`--abuser`), so their client-side work does not
slow the healthy clients' event loop: what is measured is the server. It reports each
phase's p50/p99 for the healthy clients, and what the abusers got (errors, refusals). The
claim to check: healthy p99 under abuse stays within 2x of quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import threading
import time

import orjson
import redis
import websockets
from rich.console import Console
from rich.table import Table

from benchmarks.procs import wait_ready
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import free_port, redis_server

JOB = "abuse-bench-job"


PING_EVERY = 0.2  # seconds between a healthy client's pings
PING = orjson.dumps({"op": "ping"}).decode()


async def healthy(
    url: str, latencies: list[list[float]], pings: list[list[float]], stop: asyncio.Event
) -> None:
    """A well-behaved client: connects (backing off when refused, as real clients do),
    records each event's latency in the current phase's list (`latencies[-1]`), and pings
    every `PING_EVERY` seconds, recording each round trip (`pings[-1]`)."""
    for delay in range(1, 50):
        try:
            ws = await websockets.connect(f"{url}/ws", max_queue=None)
            break
        except websockets.InvalidStatus:
            await asyncio.sleep(0.1 * delay)
    sent: list[float] = []  # pongs come back in order

    async def ping() -> None:
        await asyncio.sleep(PING_EVERY * random.random())  # spread the clients' pings
        while not stop.is_set():
            sent.append(time.perf_counter())
            await ws.send(PING)
            await asyncio.sleep(PING_EVERY)

    async with ws:
        await ws.send(orjson.dumps({"op": "subscribe", "job_ids": [JOB]}).decode())
        pinger = asyncio.create_task(ping())
        while not stop.is_set():
            try:
                frame = await asyncio.wait_for(ws.recv(), 1.0)
            except TimeoutError:
                continue
            now, received = time.time(), time.perf_counter()
            msg = orjson.loads(frame)
            if msg.get("type") == "event" and msg.get("state") == "WORKING":
                latencies[-1].append(now - msg["ts"])
            elif msg.get("type") == "pong" and sent:
                pings[-1].append(received - sent.pop(0))
        pinger.cancel()


async def subscribe_flood(url: str, stop: asyncio.Event, stats: dict[str, int], sockets: int = 20) -> None:
    """`sockets` sockets at once, each subscribe after subscribe until the server closes
    it (or time is up)."""
    await asyncio.gather(*(_flood_one(url, stop, stats, n) for n in range(sockets)))


async def _flood_one(url: str, stop: asyncio.Event, stats: dict[str, int], n: int) -> None:
    ids = [f"nope-{n}-{i}" for i in range(1000)]
    message = orjson.dumps({"op": "subscribe", "job_ids": ids}).decode()
    async with websockets.connect(f"{url}/ws", max_queue=None) as ws:

        async def drain() -> None:
            async for frame in ws:
                kind = orjson.loads(frame).get("code", "other")
                stats[kind] = stats.get(kind, 0) + 1

        reader = asyncio.create_task(drain())
        try:
            while not stop.is_set():
                await ws.send(message)
                stats["sent"] = stats.get("sent", 0) + 1
                await asyncio.sleep(0)
        except websockets.ConnectionClosed as exc:
            key = f"closed {exc.rcvd.code if exc.rcvd else 'no code'}"
            stats[key] = stats.get(key, 0) + 1
        reader.cancel()


async def connection_flood(url: str, stop: asyncio.Event, stats: dict[str, int]) -> None:
    held = []

    async def one() -> None:
        try:
            ws = await websockets.connect(f"{url}/ws", open_timeout=5)
            held.append(ws)
            await asyncio.wait_for(ws.recv(), 5)  # welcome, or the close
            stats["accepted"] = stats.get("accepted", 0) + 1
        except websockets.ConnectionClosed as exc:
            key = f"closed {exc.rcvd.code if exc.rcvd else 'no code'}"
            stats[key] = stats.get(key, 0) + 1
        except (OSError, TimeoutError, websockets.InvalidStatus):
            stats["refused"] = stats.get("refused", 0) + 1

    # Like a tight client loop (the issue measured 2,000 sockets in 1.9 s): 50 at a time.
    gate = asyncio.Semaphore(50)

    async def gated() -> None:
        async with gate:
            await one()

    await asyncio.gather(*(gated() for _ in range(2000)))
    await stop.wait()
    for ws in held:
        with contextlib.suppress(Exception):
            await ws.close()


def publisher(settings: Settings, stop: threading.Event) -> None:
    recorder = Recorder(redis.Redis.from_url(settings.redis_url), settings)
    recorder.record(JOB, "PENDING")
    step = 0
    while not stop.is_set():
        step += 1
        recorder.record(JOB, "WORKING", progress={"step": step})
        time.sleep(0.01)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] * 1000 if len(values) > 10 else float("nan")


PHASES = {
    "quiet": "quiet",
    "subscribe": "subscribe flood",
    "connect": "connection flood",
    "control": "control: flood on another process",
    "subscribe-control": "control: subscribe flood on another process",
}


async def run(clients: int, seconds: float, flooders: int, phases: list[str]) -> None:
    with redis_server() as store:
        settings = Settings(redis_url=store.url, history_limit=100)
        port = free_port()
        env = {
            **os.environ,
            "JOBWIRE_REDIS_URL": store.url,
            "JOBWIRE_LOG_LEVEL": "warning",
            "JOBWIRE_HISTORY_LIMIT": "100",
        }
        other_port = free_port()
        server, other = (
            subprocess.Popen([sys.executable, "-m", "jobwire.cli", "serve", "--port", str(p)], env=env)
            for p in (port, other_port)
        )
        url = f"http://127.0.0.1:{port}"
        for base in (url, f"http://127.0.0.1:{other_port}"):
            wait_ready(f"{base}/readyz")
        stop_pub = threading.Event()
        pub = threading.Thread(target=publisher, args=(settings, stop_pub), daemon=True)
        pub.start()
        time.sleep(0.3)
        ws_url = url.replace("http", "ws")
        rows = []
        latencies: list[list[float]] = [[]]
        pings: list[list[float]] = [[]]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(healthy(ws_url, latencies, pings, stop)) for _ in range(clients)]
        await asyncio.sleep(3.0)  # every healthy client connected, subscribed, replayed
        try:
            for phase in (PHASES[p] for p in phases):
                latencies.append([])
                pings.append([])
                stats: dict[str, int] = {}
                abuser = None
                if phase != "quiet":
                    kind = "subscribe" if "subscribe" in phase else "connect"
                    target = f"ws://127.0.0.1:{other_port}" if phase.startswith("control") else ws_url
                    cmd = [sys.executable, "-m", "benchmarks.abuse", "--abuser", kind, "--url", target]
                    cmd += ["--flooders", str(flooders)]
                    abuser = subprocess.Popen([*cmd, "--seconds", str(seconds)], stdout=subprocess.PIPE)
                await asyncio.sleep(seconds)
                measured, pinged = latencies[-1], pings[-1]
                if abuser is not None:
                    out, _ = abuser.communicate(timeout=60)
                    stats = orjson.loads(out.splitlines()[-1])
                rows.append(
                    (
                        phase,
                        len(measured),
                        pct(measured, 50),
                        pct(measured, 99),
                        pct(pinged, 50),
                        pct(pinged, 99),
                        stats,
                    )
                )
                await asyncio.sleep(1.0)  # let the abuser's sockets drain before the next phase
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            stop_pub.set()
            for proc in (server, other):
                proc.terminate()
                proc.wait(10)
    title = (
        f"{clients} healthy clients, one job at 100 events/s, pings at {1 / PING_EVERY:g}/s each, "
        f"{seconds:g}s per phase"
    )
    table = Table(title=title)
    columns = (
        "phase",
        "deliveries",
        "event p50 / p99 ms",
        "p99 vs quiet",
        "ping p50 / p99 ms",
        "p99 vs quiet",
    )
    for col in (*columns, "abuser got"):
        table.add_column(col)
    quiet_p99, quiet_ping99 = rows[0][3], rows[0][5]
    for phase, n, p50, p99, ping50, ping99, stats in rows:
        table.add_row(
            phase,
            str(n),
            f"{p50:.2f} / {p99:.2f}",
            f"{p99 / quiet_p99:.2f}x",
            f"{ping50:.2f} / {ping99:.2f}",
            f"{ping99 / quiet_ping99:.2f}x",
            ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())),
        )
    Console(width=200).print(table)


async def abuse(kind: str, url: str, seconds: float, flooders: int) -> None:
    """The abuser process: flood for `seconds`, then print what it got as JSON."""
    stop, stats = asyncio.Event(), {}  # type: ignore[var-annotated]
    asyncio.get_running_loop().call_later(seconds, stop.set)
    if kind == "subscribe":
        await subscribe_flood(url, stop, stats, flooders)
    else:
        await connection_flood(url, stop, stats)
    await stop.wait()
    print(orjson.dumps(stats).decode(), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--flooders", type=int, default=20, help="sockets in the subscribe flood")
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, from {','.join(PHASES)} (quiet first: the others are compared with it)",
    )
    p.add_argument("--abuser", choices=["subscribe", "connect"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.abuser:
        asyncio.run(abuse(args.abuser, args.url, args.seconds, args.flooders))
    else:
        phases = args.phases.split(",")
        if phases[0] != "quiet" or not set(phases) <= set(PHASES):
            p.error(f"--phases: quiet first, then any of {', '.join(PHASES)}; got {args.phases}")
        asyncio.run(run(args.clients, args.seconds, args.flooders, phases))


if __name__ == "__main__":
    main()
