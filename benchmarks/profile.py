"""Where each microsecond of a delivery goes: a scenario of `compare`, profiled on the server.

    python -m benchmarks.profile [--peer jobwire] [--scenario fan-out] [--clients 1000]
                                 [--seconds 8] [--rate 25] [--sampler both] [--raw DIR]

Runs one scenario (`fan-out`: one job, many clients; `many-jobs`: one job per client) as
`make bench` does, with a sampling profiler attached to the server for the publishing
time, and sorts every sample into what it was doing, by the innermost frame that says so:

- `py-spy record --native` (`RULES`): which Python code ran (the hub's dispatch, the
  stream core's checks, the direct write, metrics, GC…), uvloop's C, hiredis, JSON, and
  the libc call a system call was made from. The interpreter's own native frames (the
  eval loop, calls, allocation) count for the Python function they run. py-spy stops
  the process for each sample (ptrace), sees no kernel frames, and takes some samples of
  an idle loop in `epoll_wait` as busy.
- `perf record -g` (`PERF_RULES`): every CPU cycle, the kernel's by what it was doing (the
  write's own layers, loopback, waking the reader, epoll), but the interpreter as one.
- `both` (the default): one run with each, and perf's table with the interpreter's share
  split the way py-spy split its Python samples (`merged`).

Each share times the run's server CPU per delivery (from /proc) gives the microseconds a
delivery spends there; the CPU is the profiled run's, so a little above an unprofiled one.
py-spy is in the `bench` extra (`make bench` installs it); perf is the system's
(`perf_event_paranoid` must allow it, or run as root).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.compare import run_one, scenarios
from benchmarks.procs import raise_fd_limit
from benchmarks.servers import PEER_NAMES, PEERS
from tests.support import redis_server

#: (pattern on one frame, what it was doing). A sample goes to the first rule that matches
#: a frame, walking from the innermost frame outwards; native frames no rule names (the
#: interpreter's) are passed over, so their time counts for the Python code they run.
RULES: list[tuple[str, str]] = [
    (r"^(gc_collect\w*|collect|_PyGC_Collect|collect_with_callback|gc_collect_region) ", "GC"),
    # libc's system call wrappers: the kernel's time shows here (py-spy sees no kernel frames)
    (
        r"^(__libc_write|__GI___libc_write|__write|write|writev|__writev|send|__send|sendmsg) \(.*libc",
        "write system call (kernel: loopback TCP)",
    ),
    (r"^(__libc_read|__GI___libc_read|read|__read|recv|__libc_recv|readv) \(.*libc", "read system call"),
    (r"^(epoll_wait|epoll_pwait|__epoll_wait) \(.*libc|^(uv__io_poll|uv_run) ", "event loop: epoll"),
    (r" \(.*libc\.so", "other system calls and libc"),
    (r"hiredis", "hub: hiredis (reply parsing)"),
    (r"orjson", "JSON (orjson)"),
    (r"prometheus_client|/server/metrics\.py", "metrics (prometheus counters, tallies)"),
    (r"uvloop|libuv", "uvloop (transport.write, callbacks, handles: C)"),
    (r"/server/pubsub_conn\.py", "hub: pub/sub read callback"),
    (r"/server/backlog\.py", "hub: input coalescing (backlog)"),
    (r"/server/(hub|cluster_hub)\.py", "hub: dispatch and fan-out loop"),
    (r"/server/events\.py", "event parsed and framed once (events.py)"),
    (r"/jobwire/stream\.py", "stream core: the per-watcher sink and its checks"),
    (r"/server/direct\.py", "direct write: checks around transport.write"),
    (r"/server/(feed|transports|stalls)\.py", "feed and transport (queued path, writer task)"),
    (r"/server/routes/", "websocket/SSE route handlers"),
    (r"/server/lean_ws\.py", "jobwire's websocket protocol (lean_ws)"),
    (r"/server/", "jobwire server, other"),
    (r"broadcaster", "broadcaster (subscriber queues)"),
    (r"/redis/", "redis-py (pub/sub reader)"),
    (r"/uvicorn/", "uvicorn (websocket protocol, ASGI send)"),
    (r"/websockets/", "websockets (sans-I/O frames)"),
    (r"/starlette/", "Starlette (WebSocket wrappers)"),
    (r"/asyncio/", "asyncio (Python: tasks, queues, futures)"),
    (r"\.py:", "other Python"),
]
_COMPILED = [(re.compile(p), name) for p, name in RULES]

#: The same for `perf` samples (`--sampler perf`): kernel symbols, which py-spy cannot see.
#: Loopback TCP runs the receiver's side inside the writer's system call, so a `write`
#: pays for the IP layer, the receiving socket's TCP and waking the reader as well.
PERF_RULES: list[tuple[str, str]] = [
    (r"^(try_to_wake_up|ep_poll_callback|sock_def_readable|__wake_up_common)", "kernel: waking the reader"),
    (
        r"^(tcp_v4_rcv|tcp_rcv_established|tcp_data_queue|ip_rcv|ip_local_deliver|__netif_receive_skb"
        r"|process_backlog|net_rx_action)",
        "kernel: loopback receive (IP, the reader's TCP)",
    ),
    (
        r"^(loopback_xmit|dev_hard_start_xmit|__dev_queue_xmit|ip_finish_output|ip_output|__ip_queue_xmit)",
        "kernel: loopback send (IP, device)",
    ),
    (r"^(tcp_sendmsg|tcp_write_xmit|__tcp_transmit_skb|tcp_push|tcp_ack|tcp_clean_rtx)", "kernel: TCP send"),
    (r"^(tcp_recvmsg|sock_recvmsg|ksys_read)", "kernel: read"),
    (
        r"^(ksys_write|vfs_write|sock_write_iter|new_sync_write|__x64_sys_write)",
        "kernel: write (VFS, socket)",
    ),
    # mostly on the way out of a write that woke a reader: the load generator runs now
    (r"^(schedule|__schedule|finish_task_switch)", "kernel: context switch (preempted by a woken reader)"),
    (r"^(exc_page_fault|handle_mm_fault|asm_exc_page_fault)", "kernel: page faults"),
    (
        r"^(entry_SYSCALL|do_syscall_64|syscall_exit|exit_to_user_mode|syscall_return)",
        "kernel: syscall entry/exit",
    ),
]
_PERF_COMPILED = [(re.compile(p), name) for p, name in PERF_RULES]
#: A stack through epoll_wait is the loop going idle and waking up, whatever its leaf
_EPOLL = re.compile(r"^(do_epoll_wait|ep_poll|__x64_sys_epoll_wait|__x64_sys_epoll_pwait)(\.|$)")
EPOLL = "kernel: epoll_wait (going idle, waking up)"


def classify_perf(frames: list[tuple[str, str]]) -> str:
    """What a perf sample (its (symbol, object) frames, innermost first) was doing."""
    kernel = frames and frames[0][1] == "[kernel.kallsyms]"
    if kernel:
        if any(_EPOLL.search(symbol) for symbol, dso in frames if dso == "[kernel.kallsyms]"):
            return EPOLL
        for symbol, dso in frames:
            if dso != "[kernel.kallsyms]":
                break
            for pattern, name in _PERF_COMPILED:
                if pattern.search(symbol):
                    return name
        return "kernel: other"
    dso = frames[0][1] if frames else "?"
    for key, name in (
        ("uvloop", "user: uvloop (C)"),
        ("hiredis", "user: hiredis"),
        ("orjson", "user: orjson"),
        ("libpython", "user: Python interpreter (all Python code)"),
        ("/bin/python", "user: Python interpreter (all Python code)"),
        ("libc", "user: libc"),
    ):
        if key in dso:
            return name
    return f"user: {dso.rsplit('/', 1)[-1]}"


def read_perf(path: Path) -> Counter[str]:
    """`perf script` output of `path`, sorted by `classify_perf`."""
    out = subprocess.run(
        ["perf", "script", "-i", str(path)], capture_output=True, text=True, check=True
    ).stdout
    by: Counter[str] = Counter()
    for block in out.split("\n\n"):
        frames = []
        for line in block.splitlines()[1:]:
            parts = line.strip().split(" ", 1)
            if len(parts) < 2:
                continue
            symbol, _, dso = parts[1].rpartition(" (")
            frames.append((symbol.split("+0x")[0], dso.rstrip(")")))
        if frames:
            by[classify_perf(frames)] += 1
    return by


def classify(stack: list[str]) -> str:
    """What a sample (its frames, outermost first) was doing."""
    for frame in reversed(stack):
        for pattern, name in _COMPILED:
            if pattern.search(frame):
                return name
    return "other native code"


def read_raw(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw format: one `frame;frame;… count` line per distinct stack."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def self_functions(stacks: Counter[tuple[str, ...]], top: int) -> list[tuple[str, int]]:
    """The innermost Python frames, by samples: the functions to read first."""
    own: Counter[str] = Counter()
    for stack, n in stacks.items():
        frame = next((f for f in reversed(stack) if ".py:" in f), "(native only)")
        own[re.sub(r"\s*\(.*?([^/]+/[^/]+\.py):\d+\)", r" (\1)", frame)] += n
    return own.most_common(top)


def by_category(stacks: Counter[tuple[str, ...]]) -> Counter[str]:
    by: Counter[str] = Counter()
    for stack, n in stacks.items():
        by[classify(list(stack))] += n
    return by


def table(by: Counter[str], us_per_delivery: float) -> list[str]:
    total = sum(by.values()) or 1
    lines = ["| where | share of samples | µs per delivery |", "|---|---|---|"]
    for name, n in by.most_common():
        lines.append(f"| {name} | {n / total:.1%} | {n / total * us_per_delivery:.2f} |")
    lines.append(f"| **all** ({round(total):,} samples) | 100% | **{us_per_delivery:.2f}** |")
    return lines


def _sampler(sampler: str, rate: int, out: Path, pid: int, seconds: float) -> list[str]:
    duration = max(1, int(seconds) - 1)
    if sampler == "perf":
        return [
            "perf",
            "record",
            "-F",
            str(rate),
            "-g",
            "-p",
            str(pid),
            "-o",
            str(out),
            "--",
            "sleep",
            str(duration),
        ]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [
        spy,
        "record",
        "--native",
        "--full-filenames",
        "--format",
        "raw",
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--pid",
        str(pid),
        "-o",
        str(out),
    ]


#: py-spy's categories whose time perf sees outside the interpreter (system calls, C
#: extensions): left out when py-spy splits the interpreter's share (`merged`).
NATIVE = {
    "write system call (kernel: loopback TCP)",
    "read system call",
    "event loop: epoll",
    "other system calls and libc",
    "uvloop (transport.write, callbacks, handles: C)",
    "hub: hiredis (reply parsing)",
    "JSON (orjson)",
}
INTERPRETER = "user: Python interpreter (all Python code)"


def merged(spy: Counter[str], perf: Counter[str]) -> Counter[str]:
    """perf's samples, with the interpreter's share split the way py-spy split its Python
    samples: perf sees every CPU cycle (the kernel too) but not which Python code ran, and
    py-spy the reverse (it also counts some idle time in epoll_wait as busy)."""
    out = Counter({k: float(v) for k, v in perf.items() if k != INTERPRETER})
    python = {k: v for k, v in spy.items() if k not in NATIVE}
    total = sum(python.values()) or 1
    for name, n in python.items():
        out[f"Python: {name}"] = perf.get(INTERPRETER, 0) * n / total
    return out


async def _profiled_run(args: argparse.Namespace, sampler: str, raw: Path) -> Any:
    sc = scenarios(args)[args.scenario]
    if args.rate:
        name = re.sub(r"[\d.,]+ events/s", f"{args.rate:g} events/s", sc.name)
        sc = dataclasses.replace(sc, rate=args.rate, name=name)
    peer_cls = next(p for p in PEERS if p.name == args.peer)
    procs: list[subprocess.Popen[bytes]] = []
    rate = args.perf_rate if sampler == "perf" else args.sample_rate

    def watch(pids: list[int], seconds: float) -> None:
        cmd = _sampler(sampler, rate, raw, pids[0], seconds)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    with redis_server() as server:
        result = await run_one(peer_cls, sc, server.url, args, watch=watch)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        if proc.returncode:
            sys.exit(f"benchmarks.profile: {sampler} failed: {err.decode()[-500:]}")
    s = result.summary()
    print(
        f"\n{args.peer}, {sc.name}, {sampler} at {rate} Hz: {s['deliveries']:,} deliveries "
        f"({s['coalesced']:,} coalesced), {s['deliveries_per_s']:,}/s, "
        f"p50/p99 {s['p50_ms']}/{s['p99_ms']} ms, "
        f"server {s['server_core']} cores ({s['server_kernel_share']:.0%} in the kernel), "
        f"{s['cpu_us_per_delivery']} µs per delivery with the profiler on; samples in {raw}\n",
        flush=True,
    )
    return result


async def main_async(args: argparse.Namespace) -> None:
    samplers = ["py-spy", "perf"] if args.sampler == "both" else [args.sampler]
    for tool in samplers:
        if not shutil.which(tool) and not (Path(sys.executable).parent / tool).exists():
            sys.exit(f"benchmarks.profile: {tool} is missing (py-spy: `pip install -e '.[bench]'`)")
    base = args.raw or tempfile.mkdtemp(prefix="jobwire-profile-")
    spy: Counter[str] = Counter()
    if "py-spy" in samplers:
        raw = Path(base) / f"{args.peer}-{args.scenario}-py-spy.txt"
        result = await _profiled_run(args, "py-spy", raw)
        stacks = read_raw(raw)
        spy = by_category(stacks)
        print("\n".join(table(spy, result.us_per_delivery)))
        print("\nInnermost Python functions, by samples:\n")
        total = sum(stacks.values()) or 1
        for name, n in self_functions(stacks, args.top):
            print(f"  {n / total:6.1%}  {name}")
    if "perf" in samplers:
        raw = Path(base) / f"{args.peer}-{args.scenario}-perf.data"
        result = await _profiled_run(args, "perf", raw)
        perf = read_perf(raw)
        print("\n".join(table(perf, result.us_per_delivery)))
        if spy:
            print("\nBoth: perf's samples, its interpreter share split as py-spy split its Python samples:\n")
            print("\n".join(table(merged(spy, perf), result.us_per_delivery)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", default="jobwire", choices=PEER_NAMES)
    p.add_argument("--scenario", default="fan-out", choices=["fan-out", "many-jobs", "stalled", "ceiling"])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--rate", type=float, default=None, help="events/s (default: the scenario's)")
    p.add_argument("--phase", type=int, default=20)
    p.add_argument(
        "--sampler",
        default="both",
        choices=["both", "py-spy", "perf"],
        help="py-spy: which Python code; perf: every cycle, the kernel's too; both: one run each, merged",
    )
    p.add_argument(
        "--sample-rate", type=int, default=100, help="py-spy's samples per second (each stops the server)"
    )
    p.add_argument("--perf-rate", type=int, default=999, help="perf's samples per second")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--raw", default=None, help="a folder for the samples (default: a temporary one)")
    args = p.parse_args()
    raise_fd_limit()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
