"""Real parts for tests: a private redis-server, a Celery worker process, a uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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
    settings: Settings, port: int | None = None, *, app: Any = None, **config: Any
) -> AsyncIterator[RunningServer]:
    """uvicorn serving `create_app(settings)` (or `app`: a host jobwire is mounted in) in
    this event loop, on `port` or a free one, configured as `jobwire serve` configures it
    (`config` overrides uvicorn's options)."""
    app = create_app(settings) if app is None else app
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


def _ask(port: int, *args: Any) -> Any:
    """One command to the Redis (or Sentinel) on `port`, or None when it does not answer."""
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        return client.execute_command(*args)
    except redis.RedisError:
        return None
    finally:
        client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _role(port: int) -> list[Any] | None:
    """`ROLE` of the node on `port` (["master", ...] or ["slave", host, port, state, offset])."""
    answer = _ask(port, "ROLE")
    return [_text(part) if isinstance(part, bytes) else part for part in answer] if answer else None


def _link_up(server: RedisServer) -> bool:
    """Whether the replica on `server` has its link to its primary up (redis-py parses INFO)."""
    info = _ask(server.port, "INFO", "replication")
    return isinstance(info, dict) and info.get("master_link_status") == "up"


@contextlib.contextmanager
def redis_cluster(
    nodes: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000
) -> Iterator[list[RedisServer]]:
    """A real Redis Cluster of `nodes` primaries, each with `replicas` replicas, on free ports;
    slots spread and replicas placed by `redis-cli --cluster create`. Yields the primaries first
    (in slot order), then the replicas (in the order of their primaries). With replicas it comes
    back only once every replica's link to its primary is up, so a failover can happen at once:
    a replica may always be promoted (`--cluster-replica-validity-factor 0`)."""
    options = (
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        str(node_timeout_ms),
        "--cluster-replica-validity-factor",
        "0",
    )
    taken: set[int] = set()
    servers: list[RedisServer] = []
    try:
        while len(servers) < nodes * (1 + replicas):
            port = _cluster_port()
            if {port, port + 10000} & taken:
                continue
            taken |= {port, port + 10000}
            servers.append(RedisServer(extra=options, port=port))
        for server in servers:
            server.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers)]
            + ["--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        everyone = len(servers)
        wait_until_sync(
            lambda: all(
                "cluster_state:ok" in (info := _text(_ask(s.port, "CLUSTER", "INFO") or b""))
                and f"cluster_known_nodes:{everyone}" in info
                for s in servers
            ),
            what="the test cluster reaches cluster_state:ok and every node knows every other",
            timeout=30,
        )
        roles: dict[int, list[Any]] = {}

        def settled() -> bool:  # redis-cli chose the roles; wait until each node has taken its own
            for server in servers:
                role = _role(server.port)
                if role is None or role[0] not in ("master", "slave"):
                    return False
                roles[server.port] = role
            return sum(role[0] == "master" for role in roles.values()) == nodes

        wait_until_sync(settled, what=f"the test cluster has {nodes} primaries", timeout=30)
        leaders = [s for s in servers if roles[s.port][0] == "master"]
        leaders.sort(key=lambda s: _first_slot(s.port))
        followers = [s for s in servers if s not in leaders]
        order = [s.port for s in leaders]
        followers.sort(key=lambda s: order.index(int(roles[s.port][2])))
        wait_until_sync(
            lambda: all(_link_up(s) for s in followers),
            what="every replica of the test cluster has its link to its primary up",
            timeout=30,
        )
        yield leaders + followers
    finally:
        for server in servers:
            server.close()


def _slot_owners(port: int) -> list[tuple[int, int, int]] | None:
    """(first slot, last slot, primary's port) for each range, as the node on `port` sees it."""
    answer = _ask(port, "CLUSTER", "SLOTS")
    if answer is None:
        return None
    return [(int(entry[0]), int(entry[1]), int(entry[2][1])) for entry in answer]


def _first_slot(port: int) -> int:
    owned = [first for first, _, owner in _slot_owners(port) or [] if owner == port]
    return min(owned, default=16384)


def primaries(nodes: list[RedisServer]) -> list[RedisServer]:
    """The running nodes among `nodes` whose `ROLE` is master now (a failover changes this)."""
    return [n for n in nodes if n.proc is not None and (_role(n.port) or [None])[0] == "master"]


def wait_cluster_ok(nodes: list[RedisServer], *, timeout: float = 30) -> None:
    """Wait until every running node among `nodes` reports cluster_state:ok and sees all 16384
    slots served by primaries that are running nodes answering `ROLE` as master, as after a
    failover has promoted a replica in place of a primary that was stopped."""
    running = [n for n in nodes if n.proc is not None]
    if not running:
        raise ValueError("no running node to ask")
    ports = {n.port for n in running}

    def ok() -> bool:
        for node in running:
            if "cluster_state:ok" not in _text(_ask(node.port, "CLUSTER", "INFO") or b""):
                return False
            owners = _slot_owners(node.port)
            if owners is None or sum(last - first + 1 for first, last, _ in owners) != 16384:
                return False
            if not {owner for _, _, owner in owners} <= ports:
                return False
        owners = {owner for _, _, owner in _slot_owners(running[0].port) or []}
        return all((_role(port) or [None])[0] == "master" for port in owners)

    wait_until_sync(
        ok, what="every running cluster node is ok, all slots served by running primaries", timeout=timeout
    )


@dataclass
class SentinelSetup:
    """A primary, its replica and the Sentinels that watch them, all real processes."""

    primary: RedisServer  # the primary at the start; after a failover, ask current_primary_port()
    replica: RedisServer
    sentinels: list[subprocess.Popen[bytes]]
    sentinel_ports: list[int]
    master_name: str

    @property
    def url(self) -> str:
        """The Celery-style broker URL naming every Sentinel."""
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    def running_sentinel_ports(self) -> list[int]:
        pairs = zip(self.sentinels, self.sentinel_ports, strict=True)
        return [port for proc, port in pairs if proc.poll() is None]

    def current_primary_port(self) -> int:
        """The primary's port as the first Sentinel that answers names it."""
        for port in self.running_sentinel_ports():
            answer = _ask(port, "SENTINEL", "get-master-addr-by-name", self.master_name)
            if answer:
                return int(answer[1])
        raise RuntimeError("no Sentinel answers")

    def kill_primary(self) -> RedisServer:
        """SIGKILL whichever server is primary now; return it."""
        port = self.current_primary_port()
        (server,) = [s for s in self.servers if s.port == port]
        server.stop()
        return server


@contextlib.contextmanager
def redis_sentinel(
    *,
    sentinels: int = 3,
    master_name: str = "jobwire-primary",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
) -> Iterator[SentinelSetup]:
    """A primary, a replica of it, and `sentinels` Sentinels monitoring them (quorum 2, or 1
    with a single Sentinel). Comes back once the replica is in sync and every Sentinel knows
    the replica and the other Sentinels, so a failover can start at once."""
    binary = shutil.which("redis-sentinel")
    command = [binary] if binary else [shutil.which("redis-server") or "redis-server"]
    workdir = tempfile.mkdtemp(prefix="jobwire-sentinel-")
    primary = RedisServer()
    replica: RedisServer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        primary.start()
        replica = RedisServer(extra=("--replicaof", "127.0.0.1", str(primary.port)))
        replica.start()
        wait_until_sync(lambda: _link_up(replica), what="the replica is in sync with the primary")
        ports = [free_port() for _ in range(sentinels)]
        quorum = 1 if sentinels == 1 else 2
        for index, port in enumerate(ports):
            folder = Path(workdir) / f"sentinel-{index}"
            folder.mkdir()
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f'dir "{folder}"\n'
                f'logfile "{folder / "sentinel.log"}"\n'
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor {master_name} 127.0.0.1 {primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {master_name} 1\n"
            )
            procs.append(
                subprocess.Popen(
                    [*command, str(conf)] + ([] if binary else ["--sentinel"]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        setup = SentinelSetup(primary, replica, procs, ports, master_name)

        def ready(port: int) -> bool:
            master = _ask(port, "SENTINEL", "MASTER", master_name)  # redis-py: a dict of bytes
            if not isinstance(master, dict):
                return False
            fields = {_text(key): _text(value) for key, value in master.items()}
            return int(fields.get("num-other-sentinels", -1)) == sentinels - 1 and bool(
                _ask(port, "SENTINEL", "REPLICAS", master_name)
            )

        def all_ready() -> bool:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Sentinel exited with {proc.returncode}")
            return all(ready(port) for port in ports)

        wait_until_sync(
            all_ready, what="every Sentinel knows the replica and the other Sentinels", timeout=30
        )
        yield setup
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for server in (primary, replica):
            if server is not None:
                server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_sentinel_failover(setup: SentinelSetup, old_port: int, *, timeout: float = 30) -> int:
    """Wait until every running Sentinel names the same primary, not on `old_port`, and that
    primary answers `ROLE` as master; return its port."""
    found: list[int] = []

    def moved() -> bool:
        answers = [
            _ask(port, "SENTINEL", "get-master-addr-by-name", setup.master_name)
            for port in setup.running_sentinel_ports()
        ]
        if not answers or not all(answers):
            return False
        named = {int(answer[1]) for answer in answers}
        if len(named) != 1 or old_port in named:
            return False
        (port,) = named
        if (_role(port) or [None])[0] != "master":
            return False
        found[:] = [port]
        return True

    wait_until_sync(moved, what=f"the Sentinels fail over from the primary on {old_port}", timeout=timeout)
    return found[0]


async def until_serving(proc: subprocess.Popen[bytes], port: int, prefix: str = "") -> None:
    """Wait until a `jobwire serve` subprocess answers /readyz on `port`, under `prefix` where
    it is mounted (failing if it exits)."""

    async def ready() -> bool:
        assert proc.poll() is None, "jobwire serve exited"
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}{prefix}/readyz")).status_code == 200
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


@contextlib.contextmanager
def another_site(scripts: dict[str, bytes] | None = None) -> Iterator[str]:
    """A web server of a page's own on another port (another origin than jobwire's): a
    blank page at every path, but the given scripts (`{"/jobwire.js": b"…"}`). Its URL."""
    served = scripts or {}

    class Site(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            script = served.get(self.path)
            self.send_response(200)
            self.send_header("content-type", "text/javascript" if script is not None else "text/html")
            self.end_headers()
            self.wfile.write(script if script is not None else b"<!doctype html><title>shop</title>")

        def log_message(self, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()
