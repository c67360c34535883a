"""The servers a benchmark runs: jobwire and its peers, as processes, and how events reach them.

Every server runs on uvicorn with uvloop and httptools, without per-message deflate, as a
process of its own (its CPU and RSS are read from /proc), with `workers` processes when
asked: `jobwire serve --workers N`, uvicorn's `--workers N` for the peers (python-socketio
with AsyncRedisManager works there: each worker subscribes to the same Redis channel, and a
websocket-only Engine.IO session needs no sticky routing).

Publishers take a batch of `(job, n, final)` and send it in one round trip: a publisher that
paces one event per call falls behind at a few thousand events a second, and the rate it
was asked for is then not the rate offered.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import redis

from benchmarks.procs import tree, wait_ready
from benchmarks.speak import PAD, payload, state
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import ROOT, free_port

PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
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
JWT_SECRET = "benchmark-secret-benchmark-secret"  # HS256 wants 32 bytes or more

Publish = Callable[[list[tuple[str, int, bool]]], None]


class Peer:
    """A server under test: started, stopped, and published to."""

    name = ""
    probe = "/"

    def __init__(self, redis_url: str, *, workers: int = 1, phase: int = 20) -> None:
        self.redis_url = redis_url
        self.workers = workers
        self.phase = phase
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        return self.name

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "JOBWIRE_REDIS_URL": self.redis_url,
            "JOBWIRE_CELERY_APP": "jobwire.tasks.demo:app",  # the demo, on purpose (no warning)
            # one address opens every client, faster than any user would
            "JOBWIRE_MAX_CONNECTIONS_PER_ADDRESS": "1000000",
            "JOBWIRE_NEW_CONNECTIONS_PER_SECOND": "1000000",
            "JOBWIRE_MAX_CONNECTIONS_PER_USER": "1000000",
        }

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env())
        wait_ready(f"http://127.0.0.1:{self.port}{self.probe}", timeout=60)
        if self.workers > 1:  # every worker up, not just the first to answer
            deadline = time.monotonic() + 30
            while len(self.pids()) < self.workers + 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)

    def pids(self) -> list[int]:
        """The server's processes: one, or a supervisor and its workers."""
        assert self.proc is not None
        return tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = self.pids()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a handler that never ends keeps uvicorn up
            self.proc.kill()
            self.proc.wait()
        for pid in pids[1:]:  # workers the supervisor left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def prepare(self, jobs: list[str]) -> None:
        """Whatever must exist before clients subscribe to `jobs`."""

    def publisher(self) -> Publish:
        raise NotImplementedError

    def client_options(self) -> dict[str, str]:
        """What the load generator's `speak.speaker` needs to connect (a token)."""
        return {}


class JobwirePeer(Peer):
    name = "jobwire"
    probe = "/readyz"

    def __init__(self, redis_url: str, *, auth: bool = False, ws_protocol: str = "", **kw: object) -> None:
        super().__init__(redis_url, **kw)  # type: ignore[arg-type]
        self.auth = auth
        self.ws_protocol = ws_protocol  # JOBWIRE_WS_PROTOCOL ("": jobwire serve's default, its own)
        self.settings = Settings(redis_url=redis_url)

    @property
    def label(self) -> str:
        notes = [
            note
            for note, on in (("auth on", self.auth), (f"{self.ws_protocol} websockets", self.ws_protocol))
            if on
        ]
        return f"{self.name} ({', '.join(notes)})" if notes else self.name

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "jobwire.cli", "serve", "--port", str(self.port)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def env(self) -> dict[str, str]:
        env = {**super().env(), "JOBWIRE_LOG_LEVEL": "warning"}
        if self.auth:
            env.update(JOBWIRE_AUTH="jwt", JOBWIRE_JWT_SECRET=JWT_SECRET, JOBWIRE_TENANCY="single")
        if self.ws_protocol:
            env["JOBWIRE_WS_PROTOCOL"] = self.ws_protocol
        return env

    def client_options(self) -> dict[str, str]:
        if not self.auth:
            return {}
        from jobwire import mint_token

        auth = Settings(auth="jwt", jwt_secret=JWT_SECRET, tenancy="single")
        return {"token": mint_token("bench", ttl=3600, settings=auth)}

    def _recorder(self) -> Recorder:
        return Recorder(redis.Redis.from_url(self.redis_url), self.settings)

    def prepare(self, jobs: list[str]) -> None:
        recorder = self._recorder()
        for i in range(0, len(jobs), 500):
            pipe = recorder.client.pipeline(transaction=False)
            for job in jobs[i : i + 500]:
                recorder.record(job, "PENDING", pipe=pipe)
            pipe.execute()

    def publisher(self) -> Publish:
        recorder, phase = self._recorder(), self.phase

        def publish(batch: list[tuple[str, int, bool]]) -> None:
            if len(batch) == 1:
                job, n, final = batch[0]
                if final:
                    recorder.record(job, "SUCCESS", result={"n": n, "pad": PAD})
                else:
                    recorder.record(job, state(n, phase), progress={"n": n, "pad": PAD})
                return
            pipe = recorder.client.pipeline(transaction=False)
            for job, n, final in batch:
                if final:
                    recorder.record(job, "SUCCESS", result={"n": n, "pad": PAD}, pipe=pipe)
                else:
                    recorder.record(job, state(n, phase), progress={"n": n, "pad": PAD}, pipe=pipe)
            pipe.execute()

        return publish


class UvicornPeer(Peer):
    """A peer served by uvicorn from the peers' virtualenv."""

    app = ""

    def command(self) -> list[str]:
        cmd = [str(PEERS_PY), "-m", "uvicorn", self.app, "--port", str(self.port), *UVICORN]
        return cmd + (["--workers", str(self.workers)] if self.workers > 1 else [])


class RelayPeer(UvicornPeer):
    name = "broadcaster"
    app = "benchmarks.peers.relay:app"

    def publisher(self) -> Publish:
        client, phase = redis.Redis.from_url(self.redis_url), self.phase

        def publish(batch: list[tuple[str, int, bool]]) -> None:
            pipe = client.pipeline(transaction=False)
            for job, n, final in batch:
                pipe.publish(job, payload(job, n, phase, final, time.time()))
            pipe.execute()

        return publish


class SocketIOPeer(UvicornPeer):
    name = "python-socketio"
    probe = "/socket.io/?EIO=4&transport=polling"
    app = "benchmarks.peers.sio:app"

    def publisher(self) -> Publish:
        """Emits go through a write-only AsyncRedisManager in another process, as a
        worker's would (`peers/sio_emit.py`), fed `<room> <payload>` lines."""
        emitter = subprocess.Popen(
            [str(PEERS_PY), "-m", "benchmarks.peers.sio_emit"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": self.redis_url},
            stdin=subprocess.PIPE,
        )
        self._emitter = emitter
        assert emitter.stdin is not None
        pipe, phase = emitter.stdin, self.phase

        def publish(batch: list[tuple[str, int, bool]]) -> None:
            now = time.time()
            pipe.write(
                b"".join(
                    b"%s %s\n" % (job.encode(), payload(job, n, phase, final, now)) for job, n, final in batch
                )
            )
            pipe.flush()

        return publish

    def stop(self) -> None:
        emitter = getattr(self, "_emitter", None)
        if emitter is not None:
            assert emitter.stdin is not None
            emitter.stdin.close()
            try:
                emitter.wait(timeout=10)
            except subprocess.TimeoutExpired:  # still emitting a backlog nobody reads now
                emitter.kill()
                emitter.wait()
        super().stop()


PEERS: list[type[Peer]] = [JobwirePeer, RelayPeer, SocketIOPeer]
PEER_NAMES = [p.name for p in PEERS]
