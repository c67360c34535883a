"""The load generator: clients split over K processes, so the clients are never what is measured.

    python -m benchmarks.swarm        (started by `Swarm`; reads its orders on stdin)

One Python process reads about 150,000 small frames a second at most; a server that
delivers 100,000 a second on a 2-core machine, or 400,000 from several processes on a
bigger one, would be measured against its own load generator. So `Swarm` starts K
processes (`--client-procs K`), hands each every K-th client, and merges what they count.

Each process connects its clients (`speak`), then counts per client, from each frame's
read callback: events received, the transitions among them (see `speak`), what jobwire
said it coalesced or lost, events out of order, the final event, and publish-to-receive
latency into a histogram (`latency`). It says `connected` when its clients are in,
`done` when each has its final event or was closed, and its counts when told to stop.

Protocol on the pipes, one JSON document per line: the parent sends the orders, then
`stop`; the child answers `{"connected": …}`, maybe `{"done": true}`, then its counts.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from benchmarks.latency import Histogram
from benchmarks.procs import cpu_seconds, raise_fd_limit
from benchmarks.speak import Speaker, is_transition, speaker, transitions
from tests.support import ROOT

CONNECT_BATCH = 50  # clients connecting at once, per process
CONNECT_TIMEOUT = 30.0  # seconds for a client to connect and subscribe


# -- the child: one process's share of the clients ----------------------------------------------


class Client:
    """One client's counts (`__slots__`: the hot path touches these per frame)."""

    __slots__ = ("events", "got", "transitions", "coalesced", "lost", "disorder", "last", "final", "closed")

    def __init__(self, events: int) -> None:
        self.events = events  # how many its job will publish
        self.got = self.transitions = self.coalesced = self.lost = self.disorder = 0
        self.last = -1
        self.final = self.closed = False


class Share:
    """What one load-generator process runs and counts."""

    def __init__(self, orders: dict[str, Any], say: Any) -> None:
        self.orders = orders
        self.say = say
        self.speaker: Speaker = speaker(orders["peer"], **orders.get("options", {}))
        self.phase: int = orders["phase"]
        self.latency = Histogram()
        self.clients: list[Client] = []
        self.sockets: list[Any] = []
        self.waiting = 0  # healthy clients without their final event yet
        self.stalled = 0

    async def connect(self) -> None:
        port, events = self.orders["port"], self.orders["events"]
        pending = list(self.orders["clients"])
        failed, errors = 0, []
        while pending:
            batch, pending = pending[:CONNECT_BATCH], pending[CONNECT_BATCH:]
            results = await asyncio.gather(
                *(self._open(port, job, stalled, events.get(job, 0)) for job, stalled in batch),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException):
                    failed += 1
                    if len(errors) < 3:
                        errors.append(repr(r))
        self.say({"connected": len(self.sockets), "failed": failed, "errors": errors})

    async def _open(self, port: int, job: str, stalled: bool, events: int) -> None:
        # a server that never answers (or closes without a word) is an error, not a hang
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self._connect(port, job, stalled, events)

    async def _connect(self, port: int, job: str, stalled: bool, events: int) -> None:
        if stalled:
            ws = await self.speaker.connect(port, job, sock=_stalled_socket(port))
            assert ws.transport is not None
            ws.transport.pause_reading()
            self.stalled += 1
            self.sockets.append(ws)
            return
        ws = await self.speaker.connect(port, job)
        client = Client(events)
        self.clients.append(client)
        self.sockets.append(ws)
        if events:
            self.waiting += 1
        ws.on_text = self._reader(ws, client)
        ws.closed.add_done_callback(lambda _: self._closed(client))
        while not ws.inbox.empty():
            frame = ws.inbox.get_nowait()
            if frame is not None:
                ws.on_text(frame)

    def _reader(self, ws: Any, c: Client) -> Any:
        read, add, phase, clock = self.speaker.read, self.latency.add, self.phase, time.time

        def on_text(frame: bytes) -> None:
            r = read(ws, frame)
            if r is None:
                return
            ts, n, final, coalesced, lost = r
            if ts is None:  # jobwire said it lost events (a gap)
                c.lost += lost
                return
            if n < 0:  # the job's PENDING, replayed at subscribe
                return
            add((clock() - ts) * 1000.0)
            c.got += 1
            c.coalesced += coalesced
            if n <= c.last:
                c.disorder += 1
            else:
                c.last = n
            if is_transition(n, final, phase):
                c.transitions += 1
            if final and not c.final:
                c.final = True
                self._one_done()

        return on_text

    def _closed(self, c: Client) -> None:
        if not c.closed:
            c.closed = True
            if not c.final and c.events:
                self._one_done()

    def _one_done(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.say({"done": True})

    def counts(self) -> dict[str, Any]:
        out = dict.fromkeys(
            (
                "deliveries",
                "published",
                "coalesced",
                "lost",
                "disorder",
                "transitions_sent",
                "transitions_got",
                "finals",
                "complete",
                "dropped",
                "missing",
            ),
            0,
        )
        for c in self.clients:
            if not c.events:
                continue
            sent = transitions(c.events, self.phase)
            out["deliveries"] += c.got
            out["published"] += c.events
            out["coalesced"] += c.coalesced
            out["lost"] += c.lost
            out["disorder"] += c.disorder
            out["transitions_sent"] += sent
            out["transitions_got"] += min(c.transitions, sent)
            out["finals"] += c.final
            out["complete"] += c.final and c.transitions >= sent
            out["dropped"] += c.closed and not c.final
            out["missing"] += max(0, c.events - c.got - c.coalesced - c.lost)
        out["clients"] = sum(1 for c in self.clients if c.events)
        out["stalled"] = self.stalled
        out["latency"] = self.latency.to_json()
        return out

    def abort(self) -> None:
        for ws in self.sockets:
            ws.abort()


def _stalled_socket(port: int) -> Any:
    """What makes a client stall: a tiny receive window (and, once connected, a client
    that never reads again)."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def child_main() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 26)  # the orders name every client
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def say(doc: dict[str, Any]) -> None:
        sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
        sys.stdout.buffer.flush()

    share = Share(orjson.loads(await stdin.readline()), say)
    await share.connect()
    if share.waiting == 0 and share.orders["events"]:
        say({"done": True})
    await stdin.readline()  # stop (or the parent gone)
    say(share.counts())
    share.abort()


# -- the parent: K processes as one swarm ---------------------------------------------------


@dataclass
class Counts:
    """A swarm's counts, merged over its processes."""

    clients: int = 0
    stalled: int = 0
    deliveries: int = 0
    published: int = 0  # events × watchers its healthy clients were sent
    coalesced: int = 0  # events jobwire replaced by a newer one (said in the frame)
    lost: int = 0  # events jobwire said it lost (gap messages)
    disorder: int = 0  # events that arrived after a later one of the same job
    transitions_sent: int = 0
    transitions_got: int = 0
    finals: int = 0
    complete: int = 0  # clients with every transition and the final event
    dropped: int = 0  # clients closed by the server before their final event
    missing: int = 0  # events neither received, nor said coalesced or lost, by the end
    latency: Histogram = field(default_factory=Histogram)

    def add(self, doc: dict[str, Any]) -> None:
        for key, value in doc.items():
            if key == "latency":
                self.latency.merge([Histogram.from_json(value)])
            elif hasattr(self, key):
                setattr(self, key, getattr(self, key) + value)


class Swarm:
    """K load-generator processes holding `clients` ((job, stalled) pairs) on `port`."""

    def __init__(
        self,
        peer: str,
        port: int,
        clients: list[tuple[str, bool]],
        *,
        procs: int,
        events: dict[str, int],
        phase: int,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.orders = [
            {
                "peer": peer,
                "port": port,
                "clients": clients[i::procs],
                "events": events,
                "phase": phase,
                "options": options or {},
            }
            for i in range(min(procs, max(1, len(clients))))
        ]
        self.procs: list[asyncio.subprocess.Process] = []
        self.connected = self.failed = 0
        self._done = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    async def start(self, timeout: float = 300) -> None:
        raise_fd_limit()
        for orders in self.orders:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.swarm",
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert proc.stdin is not None
            proc.stdin.write(orjson.dumps(orders) + b"\n")
            await proc.stdin.drain()
            self.procs.append(proc)
        errors: list[str] = []
        for proc in self.procs:
            doc = await asyncio.wait_for(self._line(proc), timeout)
            self.connected += doc["connected"]
            self.failed += doc["failed"]
            errors += doc["errors"]
        if self.failed:
            print(f"  swarm: {self.failed} clients failed to connect, e.g. {errors[:2]}", flush=True)

    async def wait_done(self, timeout: float) -> bool:
        """Until every process says its clients have their final event (or were closed)."""
        try:
            await asyncio.wait_for(asyncio.gather(*(self._line(p) for p in self.procs)), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> Counts:
        counts = Counts()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b'"stop"\n')
            await proc.stdin.drain()
        for proc in self.procs:
            while True:  # a `done` may still be on its way
                doc = await asyncio.wait_for(self._line(proc), 60)
                if "done" not in doc:
                    break
            counts.add(doc)
            await proc.wait()
        return counts

    async def _line(self, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load-generator process {proc.pid} exited ({await proc.wait()})")
        return orjson.loads(line)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # the plain loop works, at more CPU per frame
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    _use_uvloop()
    asyncio.run(child_main())
