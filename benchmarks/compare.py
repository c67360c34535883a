"""jobwire side by side with its peers: same Redis, same client swarm, same payloads, same run.

    python -m benchmarks.compare [--quick] [--runs 3] [--clients 1000] [--client-procs 2]
                                 [--workers N] [--scenarios …] [--peers …] [--out docs]

Peers (in `.venv-peers`, see `make bench`): a Starlette + broadcaster relay (one Redis
subscription per socket) and python-socketio with AsyncRedisManager (events emitted by a
write-only manager in another process). See `servers` for how each runs, `speak` for how
the load generator talks to each, `swarm` for the load generator's processes.

Scenarios (C = `--clients`):
- many-jobs: C clients on C jobs, C events/s (one watcher per job: every event wakes the
  server) — server CPU per delivery.
- fan-out: C clients on one job, 50,000 deliveries/s offered — server CPU per delivery.
- stalled: fan-out at 20,000 deliveries/s with 5% of the clients never reading.
- ceiling: C clients on one job, 250,000 deliveries/s offered, every event a transition
  (nothing may be coalesced): the most one process delivers.
- overload: one process offered `--overload-factor` (5) × what jobwire delivers writing
  each event on its own (its ceiling, at most a core's worth at its fan-out CPU per
  delivery; see `overload_base`), measured in the same run (or `--overload-clients`):
  100 events/s on one job, with a transition every `--phase` events. p50/p99 latency,
  deliveries/s, transitions lost, coalesced and missing.
- workers: the overload's load on `--workers` processes (default: this machine's cores).
Then server RSS per idle websocket (`--idle`, jobwire with authentication on, on its own
websocket protocol and on uvicorn's, `JOBWIRE_WS_PROTOCOL=uvicorn`), and jobwire against
Celery's own way for batch status and one progress report.

Measured per scenario: server CPU per delivery (from /proc, summed over a server's
processes: the figure that survives a noisy machine), deliveries per second, publish-to-
receive latency (p50/p99/p99.9), what each client got of what was sent, server RSS per
connection, and the load generator's cores (so a saturated load generator shows). Writes
`<out>/benchmarks.json`, `<out>/benchmarks-compare.md` and `<out>/bench-cpu.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from benchmarks.procs import raise_fd_limit, tree_cpu_seconds, tree_rss_kib, tree_system_seconds
from benchmarks.report import report
from benchmarks.servers import PEER_NAMES, PEERS, PEERS_PY, JobwirePeer, Peer
from benchmarks.swarm import Counts, Swarm
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import redis_server


@dataclass
class Scenario:
    key: str
    name: str
    clients: int
    jobs: int
    rate: float  # events per second, all jobs together
    seconds: float
    stalled: float = 0.0  # the share of clients that connect, then never read
    workers: int = 1
    # Seconds to wait, after the last publish, for every final event: a server still
    # behind by then has its backlog counted as missing (socketio's took half a minute).
    drain: float = 10.0
    phase: int = 0  # a new state every this many events (0: `--phase`)

    @property
    def offered(self) -> float:
        """Deliveries per second offered: events/s × watchers per job."""
        return self.rate * self.clients / self.jobs


@dataclass
class Result:
    peer: str
    scenario: Scenario
    counts: Counts
    wall: float  # from the first publish until every client had its final event (or the drain ended)
    publish_wall: float
    server_cpu: float
    server_sys: float  # of server_cpu, in the kernel
    load_cpu: float  # the load generator: its client processes and the publisher
    rss_idle_kib: int
    rss_connected_kib: int
    rss_end_kib: int
    processes: int

    @property
    def us_per_delivery(self) -> float:
        return self.server_cpu / max(1, self.counts.deliveries) * 1e6

    def summary(self) -> dict[str, Any]:
        c, lat = self.counts, self.counts.latency
        return {
            "peer": self.peer,
            "scenario": self.scenario.key,
            "name": self.scenario.name,
            "workers": self.scenario.workers,
            "clients": c.clients,
            "deliveries": c.deliveries,
            "published": c.published,
            "offered_per_s": round(c.published / max(self.publish_wall, 1e-9)),
            "complete": f"{c.complete}/{c.clients}",
            "cpu_us_per_delivery": round(self.us_per_delivery, 2),
            # Per event and watcher: counts the work for events jobwire coalesced for a
            # client behind (fewer frames, same events), where frames alone would not.
            "cpu_us_per_event_watcher": round(self.server_cpu / max(1, c.published) * 1e6, 2),
            "deliveries_per_s": round(c.deliveries / self.wall),
            "wall_s": round(self.wall, 2),
            "server_core": round(self.server_cpu / self.wall, 2),
            "server_kernel_share": round(self.server_sys / max(self.server_cpu, 1e-9), 2),
            "load_core": round(self.load_cpu / self.wall, 2),
            "p50_ms": round(lat.percentile(0.5), 2),
            "p99_ms": round(lat.percentile(0.99), 2),
            "p999_ms": round(lat.percentile(0.999), 2),
            "transitions_sent": c.transitions_sent,
            "transitions_got": c.transitions_got,
            "transitions_lost": c.transitions_sent - c.transitions_got,
            "finals": c.finals,
            "coalesced": c.coalesced,
            "lost_said": c.lost,
            "missing": c.missing,
            "disorder": c.disorder,
            "dropped": c.dropped,
            "rss_kib_per_connection": round(
                (self.rss_connected_kib - self.rss_idle_kib) / max(1, c.clients + c.stalled), 1
            ),
            "rss_growth_mib": round((self.rss_end_kib - self.rss_connected_kib) / 1024, 1),
            "processes": self.processes,
        }


# -- one run ----------------------------------------------------------------------------


def publish_all(peer: Peer, jobs: list[str], per_job: list[int], rate: float) -> float:
    """Publish event i to job i mod J (its n: i div J) at `rate`, batching whatever is due;
    returns the seconds it took (more than asked: the publisher fell behind)."""
    publish, total, count = peer.publisher(), sum(per_job), len(jobs)
    start, i = time.perf_counter(), 0
    while i < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        batch = []
        while i < due:
            job, n = i % count, i // count
            batch.append((jobs[job], n, n == per_job[job] - 1))
            i += 1
        publish(batch)
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return time.perf_counter() - start


async def run_one(
    peer_cls: type[Peer],
    sc: Scenario,
    redis_url: str,
    args: argparse.Namespace,
    watch: Callable[[list[int], float], Any] | None = None,
) -> Result:
    """One scenario on one server. `watch(pids, seconds)`, if given, is called as the
    publishing starts (a profiler attaching to the server: see `benchmarks.profile`)."""
    phase = sc.phase or args.phase
    peer = peer_cls(redis_url, workers=sc.workers, phase=phase)
    peer.start()
    swarm: Swarm | None = None
    try:
        await asyncio.sleep(0.5)
        pids = peer.pids()
        rss_idle = tree_rss_kib(pids)
        jobs = [f"job-{i}" for i in range(sc.jobs)]
        peer.prepare(jobs)
        events = int(sc.rate * sc.seconds)
        per_job = [events // sc.jobs + (1 if j < events % sc.jobs else 0) for j in range(sc.jobs)]
        every = round(1 / sc.stalled) if sc.stalled else 0
        clients = [(jobs[i % sc.jobs], bool(every and i % every == 0)) for i in range(sc.clients)]
        swarm = Swarm(
            peer.name,
            peer.port,
            clients,
            procs=args.client_procs,
            events=dict(zip(jobs, per_job, strict=True)),
            phase=phase,
            options=peer.client_options(),
        )
        await swarm.start()
        await asyncio.sleep(1.0)
        pids = peer.pids()
        rss_connected = tree_rss_kib(pids)
        cpu0, sys0 = tree_cpu_seconds(pids), tree_system_seconds(pids)
        load0, t0 = swarm.cpu_seconds() + _self_cpu(), time.perf_counter()
        if watch is not None:
            watch(pids, sc.seconds)
        publish_wall = await asyncio.to_thread(publish_all, peer, jobs, per_job, sc.rate)
        await swarm.wait_done(timeout=sc.drain)
        wall = time.perf_counter() - t0
        cpu, sys_cpu = tree_cpu_seconds(pids) - cpu0, tree_system_seconds(pids) - sys0
        load = swarm.cpu_seconds() + _self_cpu() - load0
        rss_end = tree_rss_kib(pids)
        counts = await swarm.stop()
        return Result(
            peer=peer.name,
            scenario=sc,
            counts=counts,
            wall=wall,
            publish_wall=publish_wall,
            server_cpu=cpu,
            server_sys=sys_cpu,
            load_cpu=load,
            rss_idle_kib=rss_idle,
            rss_connected_kib=rss_connected,
            rss_end_kib=rss_end,
            processes=len(pids),
        )
    finally:
        if swarm is not None:
            swarm.kill()
        peer.stop()


async def idle_rss(peer: Peer, counts: tuple[int, ...], procs: int) -> dict[str, float]:
    """Server RSS per connected, subscribed, idle client, at each of `counts` clients."""
    peer.start()
    swarms: list[Swarm] = []
    out: dict[str, float] = {}
    try:
        await asyncio.sleep(0.5)
        base = tree_rss_kib(peer.pids())
        peer.prepare(["idle"])
        held = 0
        for n in counts:
            swarm = Swarm(
                peer.name,
                peer.port,
                [("idle", False)] * (n - held),
                procs=procs,
                events={},
                phase=1,
                options=peer.client_options(),
            )
            swarms.append(swarm)
            await swarm.start()
            held += swarm.connected
            await asyncio.sleep(1.0)
            if held < n:
                print(f"  idle: {held:,} of {n:,} connected", flush=True)
            out[str(n)] = round((tree_rss_kib(peer.pids()) - base) / max(1, held), 1)
    finally:
        for swarm in swarms:
            swarm.kill()
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


# -- the scenarios ------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    """Every scenario at `--clients` clients (the overload's size is set from the ceiling)."""
    c, s = args.clients, args.seconds
    return {
        "many-jobs": Scenario("many-jobs", f"{c:,} clients, {c:,} jobs, {c:,} events/s", c, c, c, s),
        "fan-out": Scenario(
            "fan-out", f"{c:,} clients on 1 job, {50_000 / c:g} events/s", c, 1, 50_000 / c, s
        ),
        "stalled": Scenario(
            "stalled",
            f"{c:,} clients on 1 job, {20_000 / c:g} events/s, 5% stalled",
            c,
            1,
            20_000 / c,
            s,
            0.05,
        ),
        # Saturated on purpose: stop when publishing ends, so the rate is the one sustained.
        # Every event a new state: progress jobwire could coalesce would not be delivered,
        # and the rate would say how much it skipped, not how much it can send.
        "ceiling": Scenario(
            "ceiling",
            f"{c:,} clients on 1 job, {250_000 / c:g} events/s, each a transition",
            c,
            1,
            250_000 / c,
            min(s, 5),
            drain=0,
            phase=1,
        ),
    }


def overload(args: argparse.Namespace, clients: int, workers: int) -> Scenario:
    key, rate = ("overload" if workers == 1 else "workers"), args.overload_rate
    shape = "1 process" if workers == 1 else f"{workers} processes"
    return Scenario(
        key,
        f"{clients:,} clients on 1 job, {rate:g} events/s, {shape}",
        clients,
        1,
        rate,
        args.overload_seconds,
        workers=workers,
        drain=args.overload_drain,
    )


def overload_base(results: list[Result]) -> float | None:
    """What one jobwire process delivers when it writes each event on its own, per second:
    its ceiling, but no more than a core's worth at its fan-out CPU per delivery.

    The ceiling's events are all transitions, and a process behind on its input joins a
    read's events of a job into one write per socket (`server.backlog`): there its cost
    per delivery falls the further behind it is, and on a small machine it may deliver all
    that is offered (the ceiling then only says it is higher). The overload's events are
    mostly progress, coalesced at the input, so what bounds it is a write per event and
    socket: 1 / the fan-out's CPU per delivery. None without either scenario in the run."""
    ours = [r for r in results if r.peer == "jobwire"]
    ceiling = [r.counts.deliveries / r.wall for r in ours if r.scenario.key == "ceiling"]
    per_core = [1e6 / r.us_per_delivery for r in ours if r.scenario.key == "fan-out" and r.counts.deliveries]
    bounds = [min(ceiling)] if ceiling else []
    bounds += [min(per_core)] if per_core else []
    return min(bounds) if bounds else None


def overload_clients(args: argparse.Namespace, results: list[Result]) -> int:
    """Clients for `--overload-factor` × `overload_base` at `--overload-rate` events/s on one
    job (the best peer's ceiling when jobwire is not in the run)."""
    if args.overload_clients:
        return int(args.overload_clients)
    base = overload_base(results)
    if base is None:
        ceilings = [r.counts.deliveries / r.wall for r in results if r.scenario.key == "ceiling"]
        if not ceilings:  # no calibration in this run: the 2-core machine's figure
            return 5000
        base = max(ceilings)
    return max(10, math.ceil(args.overload_factor * base / args.overload_rate))


def jobwire_has_workers() -> bool:
    """Whether this jobwire's `serve` takes `--workers` (it is being added alongside)."""
    out = subprocess.run(
        [sys.executable, "-m", "jobwire.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--workers" in out.stdout


# -- main -----------------------------------------------------------------------------------


async def _run_and_say(
    peer_cls: type[Peer], sc: Scenario, server: Any, args: argparse.Namespace, run: int, results: list[Result]
) -> None:
    began = time.monotonic()
    result = await run_one(peer_cls, sc, server.url, args)
    results.append(result)
    s = result.summary()
    print(
        f"run {run + 1} {sc.key:9} {peer_cls.name:16} {sc.clients:,} clients: "
        f"{s['cpu_us_per_delivery']} µs/delivery, {s['deliveries_per_s']:,}/s of {s['offered_per_s']:,}/s, "
        f"p50/p99 {s['p50_ms']}/{s['p99_ms']} ms, "
        f"transitions {s['transitions_got']}/{s['transitions_sent']}, "
        f"coalesced {s['coalesced']}, missing {s['missing']}, "
        f"server {s['server_core']} cores, load {s['load_core']} cores ({time.monotonic() - began:.0f} s)",
        flush=True,
    )
    server.client().flushall()


async def main_async(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    started = time.monotonic()
    results: list[Result] = []
    notes: list[str] = []
    peers = [p for p in PEERS if p.name in args.peers]
    fixed = scenarios(args)
    order = [k for k in ("ceiling", "many-jobs", "fan-out", "stalled") if k in args.scenarios]
    with redis_server() as server:
        n_overload = 0
        for run in range(args.runs):
            plan = [fixed[k] for k in order]
            for sc in plan:
                for peer_cls in peers:
                    await _run_and_say(peer_cls, sc, server, args, run, results)
            if "overload" in args.scenarios or "workers" in args.scenarios:
                # sized once, from the first run's ceiling, so every run offers the same
                n_overload = n_overload or overload_clients(args, results)
                plan = []
                if "overload" in args.scenarios:
                    plan.append(overload(args, n_overload, 1))
                if "workers" in args.scenarios and args.workers > 1:
                    plan.append(overload(args, n_overload, args.workers))
                for sc in plan:
                    for peer_cls in peers:
                        if sc.workers > 1 and peer_cls is JobwirePeer and not jobwire_has_workers():
                            note = NO_WORKERS
                            if note not in notes:
                                notes.append(note)
                                print(note, flush=True)
                            continue
                        await _run_and_say(peer_cls, sc, server, args, run, results)
        celery: dict[str, Any] = {}
        if not args.no_celery:
            celery = await asyncio.to_thread(celery_comparisons, server.url, 3 if args.quick else 10)
        idle: dict[str, dict[str, float]] = {}
        idle_peers = [
            JobwirePeer(server.url, auth=True) if c is JobwirePeer else c(server.url) for c in peers
        ]
        if JobwirePeer in peers:  # and on uvicorn's own websocket protocol: what jobwire's saves
            idle_peers.insert(1, JobwirePeer(server.url, auth=True, ws_protocol="uvicorn"))
        for peer in idle_peers:
            idle[peer.label] = await idle_rss(peer, tuple(args.idle), args.client_procs)
            print(f"idle     {peer.label:18} KiB per connection {idle[peer.label]}", flush=True)
            server.client().flushall()
    setup = {
        "runs": args.runs,
        "clients": args.clients,
        "client_procs": args.client_procs,
        "workers": args.workers,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "phase": args.phase,
        "overload_factor": args.overload_factor,
        "overload_base": round(overload_base(results) or 0),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "command": " ".join(["python -m benchmarks.compare", *sys.argv[1:]]),
    }
    report(results, celery, idle, out, setup, notes, [p.name for p in peers])
    print((out / "benchmarks-compare.md").read_text())
    print(f"make bench: {setup['minutes']} minutes", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3-second scenarios, one run, fewer scenarios")
    p.add_argument("--runs", type=int, default=None, help="runs of each scenario (default 3, quick 1)")
    p.add_argument(
        "--seconds", type=float, default=None, help="publishing time per scenario (default 8, quick 3)"
    )
    p.add_argument(
        "--clients",
        type=int,
        default=1000,
        help="clients in the many-jobs, fan-out, stalled and ceiling scenarios",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=None,
        help="load-generator processes the clients are split over (default: cores, at most 8)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes in the workers scenario (default: this machine's cores; 1 leaves it out)",
    )
    p.add_argument(
        "--overload-clients",
        type=int,
        default=None,
        help="clients in the overload scenarios (default: calibrated)",
    )
    p.add_argument(
        "--overload-factor", type=float, default=5.0, help="offered load as a multiple of jobwire's ceiling"
    )
    p.add_argument(
        "--overload-rate", type=float, default=100.0, help="events/s on the one job of the overload"
    )
    p.add_argument(
        "--overload-seconds",
        type=float,
        default=None,
        help="publishing time of the overload (default 6, quick 3)",
    )
    p.add_argument(
        "--overload-drain",
        type=float,
        default=None,
        help="seconds after the last publish to wait for finals (default 5)",
    )
    p.add_argument("--phase", type=int, default=20, help="a transition (a new state) every this many events")
    p.add_argument("--out", default="docs")
    p.add_argument("--peers", nargs="+", default=PEER_NAMES, choices=PEER_NAMES)
    p.add_argument("--scenarios", nargs="+", default=None, choices=[*SCENARIO_KEYS])
    p.add_argument("--idle", nargs="+", type=int, default=None, help="idle connections to measure RSS at")
    p.add_argument("--no-celery", action="store_true", help="leave out the Celery comparison")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.seconds is None:
        args.seconds = 3 if args.quick else 8
    if args.client_procs is None:
        args.client_procs = min(8, cores)
    if args.workers is None:
        args.workers = cores
    if args.overload_seconds is None:
        args.overload_seconds = 3 if args.quick else 6
    if args.overload_drain is None:
        args.overload_drain = 3 if args.quick else 5
    if args.scenarios is None:
        args.scenarios = QUICK_SCENARIOS if args.quick else list(SCENARIO_KEYS)
    if args.idle is None:
        args.idle = (1000,) if args.quick else (1000, 10_000)
    if not PEERS_PY.exists():
        sys.exit(
            "benchmarks.compare: the peers' virtualenv is missing; run `make bench` (it creates .venv-peers)"
        )
    limit = raise_fd_limit()
    if max(args.idle) + 100 > limit:
        sys.exit(
            f"benchmarks.compare: {max(args.idle):,} idle connections need more open files than {limit:,}"
        )
    asyncio.run(main_async(args))


NO_WORKERS = "`jobwire serve` has no `--workers` yet: jobwire is left out of the workers scenario"
SCENARIO_KEYS = ("many-jobs", "fan-out", "stalled", "ceiling", "overload", "workers")
QUICK_SCENARIOS = ["many-jobs", "fan-out", "ceiling", "overload"]

if __name__ == "__main__":
    main()
