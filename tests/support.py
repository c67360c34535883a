"""Real parts for tests: a private redis-server, a Celery worker process, a uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from jobwire.server.app import create_app
from jobwire.server.serving import Server, uvicorn_config
from jobwire.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a free port, which a test may stop and restart."""

    def __init__(
        self, *, persist: bool = False, extra: tuple[str, ...] = (), port: int | None = None
    ) -> None:
        self.persist = persist  # keep data across stop/start, as a production Redis would
        self.extra = extra
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="jobwire-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + (["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"])
            + ["--dir", self.dir, "--loglevel", "warning", *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_until_sync(lambda: _answers(client), what=f"redis-server on {self.port} answers", timeout=10)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Worker:
    """A real `celery worker` process (prefork, 2 children) against a given Redis."""

    def __init__(
        self,
        redis_url: str,
        log_path: Path,
        *,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        hostname: str = "celery@%h",
        app: str = "jobwire.tasks.demo",
        queues: str | None = None,
    ) -> None:
        self.hostname = hostname
        self.app, self.queues = app, queues
        self.redis_url = redis_url
        self.log_path = log_path
        self.concurrency = concurrency
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "JOBWIRE_REDIS_URL": self.redis_url, **self.env}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, "worker", "--pool", "prefork"]
            + (["--queues", self.queues] if self.queues else [])
            + [
                "--concurrency",
                str(self.concurrency),
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                self.hostname,
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("celery worker exited:\n" + self.log_path.read_text()[-3000:])
            return b"ready." in self.log_path.read_bytes()

        wait_until_sync(ready, what="the celery worker is ready", timeout=30, interval=0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()


@dataclass
class RunningServer:
    url: str
    ws_url: str
    app: Any
    server: Any = None  # the uvicorn server

    @property
    def services(self) -> Any:
        return self.app.state.jobwire


@contextlib.asynccontextmanager
async def run_server(
    settings: Settings, port: int | None = None, **config: Any
) -> AsyncIterator[RunningServer]:
    """uvicorn serving `create_app(settings)` in this event loop, on `port` or a free one,
    configured as `jobwire serve` configures it (`config` overrides uvicorn's options)."""
    app = create_app(settings)
    port = port or free_port()
    options: dict[str, Any] = dict(log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    server = Server(uvicorn_config(app, settings, host="127.0.0.1", port=port, **{**options, **config}))
    task = asyncio.create_task(server.serve())

    def started() -> bool:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited before it started")
        return bool(server.started)

    await wait_until(started, what="uvicorn is serving", interval=0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    """Test settings. Every test client comes from 127.0.0.1, so the per-address pace of
    new connections is lifted unless a test is about it."""
    return Settings(redis_url=redis_url, **{"new_connections_per_second": 10_000.0, **overrides})


@contextlib.contextmanager
def redis_server(*, persist: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(persist=persist)
    server.start()
    try:
        yield server
    finally:
        server.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535:
            port -= 30000  # ephemeral ports run high; look lower
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


@contextlib.contextmanager
def redis_cluster(nodes: int = 3) -> Iterator[list[RedisServer]]:
    """A real Redis Cluster of `nodes` primaries on free ports, slots spread by redis-cli."""
    options = ("--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
    servers = [RedisServer(extra=options, port=_cluster_port()) for _ in range(nodes)]
    try:
        for server in servers:
            server.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until_sync(
            lambda: all(
                b"cluster_state:ok" in s.client().execute_command("CLUSTER", "INFO") for s in servers
            ),
            what="the test cluster reaches cluster_state:ok",
            timeout=30,
        )
        yield servers
    finally:
        for server in servers:
            server.close()


async def until_serving(proc: subprocess.Popen[bytes], port: int) -> None:
    """Wait until a `jobwire serve` subprocess answers /readyz on `port` (failing if it exits)."""

    async def ready() -> bool:
        assert proc.poll() is None, "jobwire serve exited"
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_until(ready, what="jobwire serve is ready", timeout=30)


async def wait_until(condition: Any, *, what: str, timeout: float = 15.0, interval: float = 0.05) -> None:
    """Wait until `condition()` (sync or async) is true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        await asyncio.sleep(interval)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def wait_until_sync(condition: Any, *, what: str, timeout: float = 15.0, interval: float = 0.05) -> None:
    """`wait_until` for synchronous code (fixtures outside the event loop)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(interval)
