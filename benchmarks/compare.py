"""jobwire side by side with its peers: same Redis, same client swarm, same payloads, same run.

    python -m benchmarks.compare [--quick] [--runs 3] [--out docs]

Peers (in `.venv-peers`, see `make bench`): a Starlette + broadcaster relay (one Redis
subscription per socket) and python-socketio with AsyncRedisManager (events emitted by a
write-only manager in another process). Every server runs on uvicorn with uvloop and
httptools, without per-message deflate. The load generator (this process) speaks each
one's protocol over the same minimal websocket client (`benchmarks/rawws.py`), cheap
enough per frame that the servers, not the clients, are what is measured.

Measured per scenario: server CPU per delivery (from /proc, the figure that survives a
noisy machine), deliveries per second, publish-to-receive latency (p50/p99/p99.9), server
RSS per connection, and which process was busiest. Then jobwire against Celery's own way
for batch status and for one progress report. Writes `<out>/benchmarks.json`, the
Markdown report `<out>/benchmarks-compare.md` and PNG charts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from benchmarks import rawws
from benchmarks.procs import cpu_seconds, rss_kib, system_seconds, wait_ready
from benchmarks.rawws import RawWS
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import ROOT, free_port, redis_server

PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
PAD = "x" * 60  # with the job id and timestamp, a payload of about 100 bytes
UVICORN = [
    "--log-level",
    "warning",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--ws-per-message-deflate",
    "false",
]


@dataclass
class Scenario:
    name: str
    clients: int
    jobs: int
    rate: float  # events per second, all jobs together
    seconds: float
    stalled: float = 0.0  # the share of clients that connect, then never read


@dataclass
class Result:
    peer: str
    scenario: str
    deliveries: int
    expected: int
    wall: float
    complete: int  # clients that got their job's last event
    server_cpu: float
    server_sys: float  # of server_cpu, in the kernel
    client_cpu: float
    rss_idle_kib: int
    rss_connected_kib: int
    clients: int
    latencies_ms: list[float] = field(repr=False)
    rss_end_kib: int = 0

    @property
    def us_per_delivery(self) -> float:
        return self.server_cpu / max(1, self.deliveries) * 1e6

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms) or [float("nan")]
        pick = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))]  # noqa: E731
        return {
            "peer": self.peer,
            "scenario": self.scenario,
            "deliveries": self.deliveries,
            "published": self.expected,
            "complete": f"{self.complete}/{self.clients}",
            "cpu_us_per_delivery": round(self.us_per_delivery, 2),
            # Per event and watcher: counts the work for events jobwire coalesced for a
            # client behind (fewer frames, same events), where frames alone would not.
            "cpu_us_per_event_watcher": round(self.server_cpu / max(1, self.expected) * 1e6, 2),
            "deliveries_per_s": round(self.deliveries / self.wall),
            "server_core": round(self.server_cpu / self.wall, 2),
            "server_kernel_share": round(self.server_sys / max(self.server_cpu, 1e-9), 2),
            "client_core": round(self.client_cpu / self.wall, 2),
            "p50_ms": round(pick(0.5), 2),
            "p99_ms": round(pick(0.99), 2),
            "p999_ms": round(pick(0.999), 2),
            "rss_kib_per_connection": round((self.rss_connected_kib - self.rss_idle_kib) / self.clients, 1),
            "rss_growth_mib": round((self.rss_end_kib - self.rss_connected_kib) / 1024, 1),
        }


# -- the peers --------------------------------------------------------------------------


class Peer:
    name = ""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "JOBWIRE_REDIS_URL": self.redis_url,
            "JOBWIRE_MAX_CONNECTIONS_PER_ADDRESS": "1000000",
            "JOBWIRE_NEW_CONNECTIONS_PER_SECOND": "1000000",
            "JOBWIRE_MAX_CONNECTIONS_PER_USER": "1000000",
        }
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env)
        wait_ready(f"http://127.0.0.1:{self.port}{self.probe}")

    probe = "/"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # a handler that never ends keeps uvicorn up
                self.proc.kill()
                self.proc.wait()

    async def connect(self, job: str, sock: socket.socket | None = None) -> RawWS:
        """A client watching `job` (on `sock`, if given: a stalled client's)."""
        raise NotImplementedError

    def timestamp(self, frame: str | bytes) -> tuple[float, bool] | None:
        """An event frame's publish time and whether it is the job's last; None for
        anything else."""
        raise NotImplementedError

    def publisher(self) -> Any:
        raise NotImplementedError


class JobwirePeer(Peer):
    name = "jobwire"
    probe = "/readyz"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "jobwire.cli", "serve", "--port", str(self.port)]

    async def connect(self, job: str, sock: socket.socket | None = None) -> RawWS:
        ws = await rawws.connect(self.port, "/ws", sock=sock)
        ws.send_text(orjson.dumps({"op": "subscribe", "job_ids": [job]}).decode())
        while b'"subscribed"' not in await ws.recv():
            pass
        return ws

    def timestamp(self, frame: str | bytes) -> tuple[float, bool] | None:
        msg = orjson.loads(frame)
        return (msg["ts"], msg["final"]) if msg.get("type") == "event" else None

    def publisher(self) -> Any:
        recorder = Recorder(redis.Redis.from_url(self.redis_url), Settings(redis_url=self.redis_url))

        def publish(job: str, final: bool) -> None:
            if final:
                recorder.record(job, "SUCCESS", result={"pad": PAD})
            else:
                recorder.record(job, "WORKING", progress={"pad": PAD})

        return publish


class UvicornPeer(Peer):
    """A peer served by uvicorn from the peers' virtualenv."""

    app = ""

    def command(self) -> list[str]:
        return [str(PEERS_PY), "-m", "uvicorn", self.app, "--port", str(self.port), *UVICORN]


class RelayPeer(UvicornPeer):
    name = "broadcaster"

    app = "benchmarks.peers.relay:app"

    async def connect(self, job: str, sock: socket.socket | None = None) -> RawWS:
        ws = await rawws.connect(self.port, f"/ws/{job}", sock=sock)
        await ws.recv()  # {"type":"subscribed"}
        return ws

    def timestamp(self, frame: str | bytes) -> tuple[float, bool] | None:
        msg = orjson.loads(frame)
        return float(msg["ts"]), bool(msg["final"])

    def publisher(self) -> Any:
        client = redis.Redis.from_url(self.redis_url)

        def publish(job: str, final: bool) -> None:
            client.publish(job, orjson.dumps({"job": job, "ts": time.time(), "final": final, "pad": PAD}))

        return publish


class SocketIOPeer(UvicornPeer):
    name = "python-socketio"
    probe = "/socket.io/?EIO=4&transport=polling"

    app = "benchmarks.peers.sio:app"

    async def connect(self, job: str, sock: socket.socket | None = None) -> RawWS:
        ws = await rawws.connect(self.port, f"/socket.io/?EIO=4&transport=websocket&job={job}", sock=sock)
        await ws.recv()  # 0{"sid":…}: the Engine.IO handshake
        ws.send_text("40")  # join the default namespace
        while not (await ws.recv()).startswith(b"40"):
            pass
        return ws

    def timestamp(self, frame: str | bytes) -> tuple[float, bool] | None:
        text = frame.decode() if isinstance(frame, bytes) else frame
        if text.startswith("42"):
            msg = orjson.loads(orjson.loads(text[2:])[1])
            return float(msg["ts"]), bool(msg["final"])
        return None

    def publisher(self) -> Any:
        emitter = subprocess.Popen(
            [str(PEERS_PY), "-m", "benchmarks.peers.sio_emit"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": self.redis_url},
            stdin=subprocess.PIPE,
        )
        self._emitter = emitter
        assert emitter.stdin is not None
        pipe = emitter.stdin

        def publish(job: str, final: bool) -> None:
            payload = orjson.dumps({"job": job, "ts": time.time(), "final": final, "pad": PAD}).decode()
            pipe.write(f"{job} {payload}\n".encode())
            pipe.flush()

        return publish

    def stop(self) -> None:
        emitter = getattr(self, "_emitter", None)
        if emitter is not None:
            emitter.stdin.close()
            emitter.wait()
        super().stop()


PEERS: list[type[Peer]] = [JobwirePeer, RelayPeer, SocketIOPeer]


# -- one run ----------------------------------------------------------------------------


def _read(peer: Peer, ws: RawWS, latencies: list[float], got: list[int]) -> asyncio.Future[None]:
    """Count a client's events until its job's last one, from the socket's read callback
    (jobwire may send fewer than were published, coalescing progress for a client behind,
    so the last event, not a count, says the client is done)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_text(frame: bytes) -> None:
        if frame == b"2":  # Engine.IO ping
            ws.send_text("3")
            return
        event = peer.timestamp(frame)
        if event is None:
            return
        latencies.append((time.time() - event[0]) * 1000)
        got[0] += 1
        if event[1] and not done.done():
            got[1] = 1
            done.set_result(None)

    ws.on_text = on_text
    while not ws.inbox.empty():
        on_text(ws.inbox.get_nowait())
    return done


async def run_one(peer_cls: type[Peer], scenario: Scenario, redis_url: str) -> Result:
    peer = peer_cls(redis_url)
    peer.start()
    try:
        await asyncio.sleep(0.5)
        rss_idle = rss_kib(peer.proc.pid)  # type: ignore[union-attr]
        jobs = [f"job-{i}" for i in range(scenario.jobs)]
        if isinstance(peer, JobwirePeer):
            recorder = Recorder(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url))
            for job in jobs:
                recorder.record(job, "PENDING")
        sockets, stalled = [], []
        every = round(1 / scenario.stalled) if scenario.stalled else 0
        for i in range(scenario.clients):
            if every and i % every == 0:
                ws = await peer.connect(jobs[i % scenario.jobs], sock=_stalled_socket(peer.port))
                assert ws.transport is not None
                ws.transport.pause_reading()
                stalled.append(ws)
            else:
                sockets.append(await peer.connect(jobs[i % scenario.jobs]))
        await asyncio.sleep(1.0)
        rss_connected = rss_kib(peer.proc.pid)  # type: ignore[union-attr]
        events = int(scenario.rate * scenario.seconds)
        per_client = [
            events // scenario.jobs + (1 if i % scenario.jobs < events % scenario.jobs else 0)
            for i in range(scenario.clients)
            if not (every and i % every == 0)
        ]
        latencies: list[float] = []
        counters = [[0, 0] for _ in sockets]  # events received, saw the last
        readers = [_read(peer, ws, latencies, counters[i]) for i, ws in enumerate(sockets)]
        publish = peer.publisher()

        def publish_all() -> None:
            start = time.perf_counter()
            for n in range(events):
                publish(jobs[n % scenario.jobs], n >= events - scenario.jobs)
                delay = start + (n + 1) / scenario.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

        pid = peer.proc.pid  # type: ignore[union-attr]
        cpu0, sys0, client0, t0 = cpu_seconds(pid), system_seconds(pid), _self_cpu(), time.perf_counter()
        await asyncio.to_thread(publish_all)
        await asyncio.wait(readers, timeout=60)
        wall = time.perf_counter() - t0
        cpu, client = cpu_seconds(pid) - cpu0, _self_cpu() - client0
        sys_cpu = system_seconds(pid) - sys0
        rss_end = rss_kib(peer.proc.pid)  # type: ignore[union-attr]
        for ws in sockets + stalled:
            ws.abort()
        return Result(
            peer=peer.name,
            scenario=scenario.name,
            deliveries=sum(c[0] for c in counters),
            expected=sum(per_client),
            complete=sum(c[1] for c in counters),
            wall=wall,
            server_cpu=cpu,
            server_sys=sys_cpu,
            client_cpu=client,
            rss_idle_kib=rss_idle,
            rss_connected_kib=rss_connected,
            clients=len(sockets),
            latencies_ms=latencies,
            rss_end_kib=rss_end,
        )
    finally:
        peer.stop()


def _stalled_socket(port: int) -> socket.socket:
    """What makes a client stall: a tiny receive window (and, once connected, a client
    that never reads again)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def idle_rss(peer_cls: type[Peer], redis_url: str, counts: tuple[int, ...]) -> dict[str, float]:
    """Server RSS per connected, subscribed, idle client, at each of `counts` clients."""
    peer = peer_cls(redis_url)
    peer.start()
    sockets: list[Any] = []
    out = {}
    try:
        await asyncio.sleep(0.5)
        base = rss_kib(peer.proc.pid)  # type: ignore[union-attr]
        if isinstance(peer, JobwirePeer):
            Recorder(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url)).record("idle", "PENDING")
        for n in counts:
            while len(sockets) < n:
                batch = min(200, n - len(sockets))
                sockets += await asyncio.gather(*(peer.connect("idle") for _ in range(batch)))
            await asyncio.sleep(1.0)
            out[str(n)] = round((rss_kib(peer.proc.pid) - base) / n, 1)  # type: ignore[union-attr]
    finally:
        for ws in sockets:
            ws.abort()
        peer.stop()
    return out


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


# -- Celery's way against jobwire's --------------------------------------------------------


def celery_comparisons(redis_url: str, rounds: int) -> dict[str, Any]:
    """Batch status against the `AsyncResult` loop, and one progress report's cost."""
    from celery import Celery
    from celery.result import AsyncResult

    settings = Settings(redis_url=redis_url)
    app = Celery("bench", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.result_backend_transport_options = {"global_keyprefix": settings.key_prefix}
    recorder = Recorder(redis.Redis.from_url(redis_url), settings, app=app)
    ids = [f"batch-{i}" for i in range(1000)]
    for job_id in ids:
        recorder.record_state(job_id, "PROCESSING", {"step": 1, "total": 2})
    out: dict[str, Any] = {}
    peer = JobwirePeer(redis_url)
    peer.start()
    try:
        for n in (100, 1000):
            body = orjson.dumps({"job_ids": ids[:n]})
            url = f"http://127.0.0.1:{peer.port}/api/v1/jobs/batch-status"
            ours, loop = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                req = urllib.request.Request(url, body, {"content-type": "application/json"})
                json.loads(urllib.request.urlopen(req).read())
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                [AsyncResult(j, app=app).state for j in ids[:n]]
                loop.append(time.perf_counter() - t)
            out[f"batch_{n}"] = {
                "jobwire_ms": round(statistics.median(ours) * 1000, 2),
                "asyncresult_loop_ms": round(statistics.median(loop) * 1000, 2),
                "ratio": round(statistics.median(loop) / statistics.median(ours), 1),
            }
    finally:
        peer.stop()
    client = recorder.client
    before = _script_calls(client)
    t = time.perf_counter()
    for i in range(1000):
        recorder.record_state("report-cost", "PROCESSING", {"step": i, "total": 1000})
    ours_us = (time.perf_counter() - t) / 1000 * 1e6
    after = _script_calls(client)
    t = time.perf_counter()
    for i in range(1000):
        app.backend.store_result("report-celery", {"step": i, "total": 1000}, "PROCESSING")
    celery_us = (time.perf_counter() - t) / 1000 * 1e6
    out["progress_report"] = {
        "jobwire_us": round(ours_us, 1),
        "jobwire_round_trips": round((after - before) / 1000, 2),
        "celery_update_state_us": round(celery_us, 1),
        "note": "jobwire's one round trip writes Celery's result, the event, the history and publishes",
    }
    return out


def _script_calls(client: Any) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


# -- the report -------------------------------------------------------------------------


def report(
    results: list[Result], celery: dict[str, Any], idle: dict[str, dict[str, float]], out: Path, runs: int
) -> None:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r.scenario, r.peer), []).append(r.summary())
    table = []
    for runs_ in rows.values():
        cpu = [s["cpu_us_per_delivery"] for s in runs_]
        med = runs_[sorted(range(len(cpu)), key=cpu.__getitem__)[len(cpu) // 2]]
        table.append({**med, "cpu_us_spread": [min(cpu), max(cpu)], "runs": len(runs_)})
    (out / "benchmarks.json").write_text(
        json.dumps({"scenarios": table, "celery": celery, "idle_rss_kib_per_connection": idle}, indent=2)
    )
    lines = [
        "# jobwire and its peers, same run",
        "",
        f"`python -m benchmarks.compare` ({runs} run(s) each; the median by CPU per delivery,",
        "its spread in brackets), on this 2-core machine, loopback, every server on uvicorn +",
        "uvloop + httptools, 100-byte payloads. Cores: CPU seconds per wall second of the",
        "server and of the load generator (clients and publisher), to say which saturated.",
        "",
        "| scenario | server | CPU per delivery (µs) | per event × watcher (µs) | deliveries/s "
        "| p50 / p99 / p99.9 (ms) | frames / published | clients complete | server core (kernel share) "
        "| load core "
        "| RSS per connection (KiB) | RSS growth in the run (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in table:
        spread = f"{s['cpu_us_spread'][0]}–{s['cpu_us_spread'][1]}"
        latency = f"{s['p50_ms']} / {s['p99_ms']} / {s['p999_ms']}"
        lines.append(
            f"| {s['scenario']} | {s['peer']} | **{s['cpu_us_per_delivery']}** ({spread}) "
            f"| {s['cpu_us_per_event_watcher']} | {s['deliveries_per_s']:,} | {latency} "
            f"| {s['deliveries']:,} / {s['published']:,} "
            f"| {s['complete']} "
            f"| {s['server_core']} ({s['server_kernel_share']:.0%}) | {s['client_core']} "
            f"| {s['rss_kib_per_connection']} "
            f"| {s['rss_growth_mib']} |"
        )
    counts = sorted({n for per in idle.values() for n in per}, key=int)
    lines += [
        "",
        "Server RSS per idle connection (connected and subscribed to one job), KiB:",
        "",
        "| server | " + " | ".join(f"{int(n):,} connections" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for name, per in idle.items():
        lines.append(f"| {name} | " + " | ".join(str(per.get(n, "")) for n in counts) + " |")
    lines += [
        "",
        "Celery's own way against jobwire's:",
        "",
        "| measure | jobwire | Celery | ratio |",
        "|---|---|---|---|",
    ]
    for n in (100, 1000):
        b = celery[f"batch_{n}"]
        lines.append(
            f"| batch status of {n:,} ids | {b['jobwire_ms']} ms "
            f"| {b['asyncresult_loop_ms']} ms (AsyncResult loop) | {b['ratio']}× |"
        )
    p = celery["progress_report"]
    lines.append(
        f"| one progress report (worker) | {p['jobwire_us']} µs, {p['jobwire_round_trips']} round trip "
        f"| {p['celery_update_state_us']} µs (update_state) | |"
    )
    (out / "benchmarks-compare.md").write_text("\n".join(lines) + "\n")
    _charts(table, out)


def _charts(table: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({s["scenario"] for s in table})
    peers = [p.name for p in PEERS]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 3.5))
    for ax, scenario in zip(axes if len(scenarios) > 1 else [axes], scenarios, strict=True):
        values = [
            next((s["cpu_us_per_delivery"] for s in table if s["scenario"] == scenario and s["peer"] == p), 0)
            for p in peers
        ]
        ax.bar(peers, values, color=["#2f6fde", "#999999", "#bbbbbb"])
        ax.set_title(scenario, fontsize=9)
        ax.set_ylabel("server CPU per delivery (µs)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench-cpu.png", dpi=110)


SCENARIOS = {
    "many-jobs": Scenario("1,000 clients, 1,000 jobs, 1,000 events/s", 1000, 1000, 1000, 10),
    "one-job": Scenario("1,000 clients on 1 job, 50 events/s", 1000, 1, 50, 10),
    "throughput": Scenario("1,000 clients on 1 job, 100 events/s", 1000, 1, 100, 10),
    # At 20 events/s the load generator keeps up, so healthy clients' latency is the server's.
    "stalled": Scenario("1,000 clients on 1 job, 20 events/s, 5% stalled", 1000, 1, 20, 10, stalled=0.05),
}
QUICK_SCENARIOS = ["many-jobs", "one-job"]


async def main_async(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    seconds = 3 if args.quick else 10
    results: list[Result] = []
    with redis_server() as server:
        for run in range(args.runs):
            for key in args.scenarios:
                sc = dataclasses.replace(SCENARIOS[key], seconds=seconds)
                for peer_cls in (p for p in PEERS if p.name in args.peers):
                    result = await run_one(peer_cls, sc, server.url)
                    results.append(result)
                    print(f"run {run + 1} {key:9} {peer_cls.name:16} {result.summary()}", flush=True)
                    server.client().flushall()
        celery = await asyncio.to_thread(celery_comparisons, server.url, 3 if args.quick else 10)
        idle: dict[str, dict[str, float]] = {}
        for peer_cls in (p for p in PEERS if p.name in args.peers):
            idle[peer_cls.name] = await idle_rss(peer_cls, server.url, args.idle)
            print(f"idle     {peer_cls.name:16} KiB per connection {idle[peer_cls.name]}", flush=True)
            server.client().flushall()
    report(results, celery, idle, out, args.runs)
    print((out / "benchmarks-compare.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3-second scenarios, one run (under 2 minutes)")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--out", default="docs")
    p.add_argument("--peers", nargs="+", default=[p.name for p in PEERS], choices=[p.name for p in PEERS])
    p.add_argument("--scenarios", nargs="+", default=None, choices=list(SCENARIOS))
    p.add_argument("--idle", nargs="+", type=int, default=None, help="idle connections to measure RSS at")
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.scenarios is None:
        args.scenarios = QUICK_SCENARIOS if args.quick else list(SCENARIOS)
    if args.idle is None:
        args.idle = (1000,) if args.quick else (1000, 10_000)
    if not PEERS_PY.exists():
        sys.exit(
            "benchmarks.compare: the peers' virtualenv is missing; run `make bench` (it creates .venv-peers)"
        )
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
