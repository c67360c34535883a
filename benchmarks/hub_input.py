"""The hub's input path, in one process with no sockets: pub/sub messages fed to the
connection's `data_received` as a read would bring them, dispatched to real stream cores
(`ClientStream.live`, the socket taking every frame at once).

    python -m benchmarks.hub_input [--before DIR] [--repeat 5]

Scenarios: one event per read (4,000 watchers on one job; 4,000 jobs of one watcher each),
reads of 8 events of 8 jobs, and reads of 5 events of one job (a process behind on its
input: the case `server.backlog` coalesces). Reports CPU microseconds per event read (this
process's CPU time, so other load on the machine counts less), the best of `--repeat`
runs. `--before DIR` loads `hub.py` and `pubsub_conn.py` from DIR instead (e.g.
`git show HEAD~1:server/hub.py > DIR/hub.py`), to compare two versions of the path.
Figures, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from jobwire.protocol import Keys
from jobwire.server import hub as hub_module
from jobwire.server import pubsub_conn as conn_module
from jobwire.stream import ClientStream


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def _message(channel: str, payload: bytes) -> bytes:
    ch = channel.encode()
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ch), ch, len(payload), payload)


def _payload(job: str, seq: int) -> bytes:
    return orjson.dumps(
        {
            "job_id": job,
            "seq": seq,
            "state": "WORKING",
            "progress": {"step": seq, "total": 100000, "percent": 1.0},
            "ts": 1795471473.21,
            "final": False,
        }
    )


def _cores(keys: Keys, job: str, n: int) -> list[ClientStream]:
    cores = []
    for _ in range(n):
        core = ClientStream(keys, queue_limit=100, max_bytes=1 << 20)
        core.begin(job, 0, None)
        core.write_now = lambda frame, count: True
        cores.append(core)
    return cores


def _scenario(
    hubs: ModuleType,
    conns: ModuleType,
    *,
    jobs: int,
    watchers: int,
    per_read: int,
    same_job: bool,
    reads: int,
) -> float:
    """Microseconds per event read."""

    async def run() -> float:
        keys = Keys("jobwire:")
        hub = hubs.Hub("redis://unused")
        names = [f"j{i}" for i in range(jobs)]
        for job in names:
            sinks = {core.live for core in _cores(keys, job, watchers)}
            lane = getattr(hubs, "Lane", None)  # (a hub before lanes keeps a set)
            hub._sinks[keys.job_channel(job)] = lane(sinks) if lane is not None else sinks
        on_replies = getattr(hub, "_on_replies", None)
        try:
            conn = conns.PubSubConnection(hub._on_reply, on_replies=on_replies)
        except TypeError:  # the version before `on_replies`
            conn = conns.PubSubConnection(hub._on_reply)
        seq = dict.fromkeys(names, 0)
        chunks = []
        turn = 0
        for _ in range(reads):
            parts = []
            for i in range(per_read):
                job = names[turn % jobs] if same_job else names[(turn + i) % jobs]
                seq[job] += 1
                parts.append(_message(keys.job_channel(job), _payload(job, seq[job])))
            turn += 1 if same_job else per_read
            chunks.append(b"".join(parts))
        started = time.process_time()
        for chunk in chunks:
            conn.data_received(chunk)
        return (time.process_time() - started) / (reads * per_read) * 1e6

    return asyncio.run(run())


SCENARIOS = {
    "1 event a read, 4,000 watchers of 1 job": dict(
        jobs=1, watchers=4000, per_read=1, same_job=True, reads=200
    ),
    "1 event a read, 4,000 jobs of 1 watcher": dict(
        jobs=4000, watchers=1, per_read=1, same_job=False, reads=40000
    ),
    "8 events of 8 jobs a read, 1 watcher each": dict(
        jobs=4000, watchers=1, per_read=8, same_job=False, reads=5000
    ),
    "5 events of 1 job a read, 4,000 watchers (behind)": dict(
        jobs=1, watchers=4000, per_read=5, same_job=True, reads=60
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a folder with another hub.py and pubsub_conn.py")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    hubs: Any = hub_module
    conns: Any = conn_module
    if args.before is not None:
        conns = _load("pubsub_conn", args.before / "pubsub_conn.py")
        hubs = _load("hub", args.before / "hub.py")
    label = str(args.before) if args.before else "this tree"
    print(f"hub input path ({label}), best of {args.repeat}: µs per event read")
    for name, options in SCENARIOS.items():
        best = min(_scenario(hubs, conns, **options) for _ in range(args.repeat))  # type: ignore[arg-type]
        print(f"  {name:<52} {best:10.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
