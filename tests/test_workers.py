"""`jobwire serve --workers N`: one port served by N processes, each with its own hub.

Real processes on a real port, as an operator runs them. Which worker holds a connection
is read from the kernel (the socket's inode among the worker's file descriptors in
/proc), so the server says nothing extra for tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from jobwire.server.workers import cgroup_cpu_quota, cores_in_quota, usable_cores, worker_count
from jobwire.settings import SettingsError
from tests.clients import next_of, submit
from tests.support import RedisServer, free_port, until_serving, wait_until
from tests.test_mount import HOST_MODULE, PREFIX

SERVE = [sys.executable, "-m", "jobwire.cli", "serve"]
STARTED = re.compile(r"from (\d+) worker processes \(pids ([\d, ]+); supervisor (\d+)\)")


def _env(**extra: str) -> dict[str, str]:
    """The test's environment, without its JOBWIRE_ variables; many new connections a
    second from one address (a test opens them until each worker holds one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWIRE_")}
    return {**env, "JOBWIRE_NEW_CONNECTIONS_PER_SECOND": "1000", **extra}


@asynccontextmanager
async def _serving(
    args: list[str], env: dict[str, str], log: Path, *, cwd: Path | None = None, prefix: str = ""
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int, list[int]]]:
    """`jobwire serve …` on a free port until it is ready: the process, the port, and the
    workers' pids from its start line."""
    port = free_port()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*SERVE, "--port", str(port), *args], env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        await until_serving(proc, port, prefix)
        await wait_until(lambda: STARTED.search(log.read_text()), what="the start line names the workers")
        started = STARTED.search(log.read_text())
        assert started is not None
        pids = [int(pid) for pid in started[2].split(", ")]
        assert len(pids) == int(started[1]) and int(started[3]) == proc.pid
        yield proc, port, pids
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _holder(port: int, ws: Any, pids: list[int]) -> int | None:
    """The pid among `pids` whose process holds the server's end of `ws`, a connection to
    `port`, or None (not yet accepted)."""
    client_port = ws.local_address[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


async def _one_socket_per_worker(url: str, port: int, pids: list[int]) -> dict[int, Any]:
    """Open websockets until every worker holds one; close the rest. By worker pid."""
    held: dict[int, Any] = {}
    spare = []
    for _ in range(200):
        ws = await websockets.connect(url)
        await next_of(ws, "welcome")
        pid = _holder(port, ws, pids)
        assert pid is not None, "no worker holds the connection"
        if pid in held:
            spare.append(ws)
        else:
            held[pid] = ws
        if len(held) == len(pids):
            break
    for ws in spare:
        await ws.close()
    assert sorted(held) == sorted(pids), f"200 connections, all on {sorted(held)} of {pids}"
    return held


async def _close_code(ws: Any) -> int | None:
    """How the server closed `ws` (reading whatever it sent before)."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 15)
    return ws.close_code  # type: ignore[no-any-return]


def _alive(pid: int) -> bool:
    """A process that has not exited (a zombie waiting for its new parent has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_ports(n: int) -> int:
    """The first of `n` consecutive ports that are free now."""
    for _ in range(50):
        first, socks = free_port(), []
        try:
            for port in range(first, first + n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports")


def _websocket_connections(metrics: str) -> float:
    found = re.search(r'^jobwire_connections\{transport="websocket"\} (\S+)$', metrics, re.M)
    return float(found[1]) if found else 0.0


async def test_two_workers_serve_one_port_each_with_its_own_hub(
    session_redis: RedisServer, result_dir: Path, worker: object, tmp_path: Path
) -> None:
    """JOBWIRE_WORKERS=2: connections land on two processes, and a job's events reach the
    websockets on both (each worker's hub subscribes for itself). With JOBWIRE_METRICS_ADDR,
    each worker serves its own /metrics on a port of its own (the first's, then the next).
    The supervisor SIGKILLed, its workers say goodbye (1001) and leave."""
    metrics = _free_ports(2)
    env = _env(
        JOBWIRE_REDIS_URL=session_redis.url,
        JOBWIRE_RESULT_DIR=str(result_dir),
        JOBWIRE_CELERY_APP="jobwire.tasks.demo:app",
        JOBWIRE_WORKERS="2",
        JOBWIRE_METRICS_ADDR=f"127.0.0.1:{metrics}",
    )
    async with _serving([], env, tmp_path / "serve.log") as (proc, port, pids):
        assert len(set(pids)) == 2 and proc.pid not in pids
        held = await _one_socket_per_worker(f"ws://127.0.0.1:{port}/ws", port, pids)
        for ws in held.values():
            await ws.send(json.dumps({"op": "subscribe_all"}))
            await next_of(ws, "subscribed_all")
        job_id = await submit(f"http://127.0.0.1:{port}", "long_running_task", delay=0.1)

        async def states(ws: Any) -> list[str]:
            seen: list[str] = []
            while not seen or seen[-1] != "SUCCESS":
                msg = await next_of(ws, "event", timeout=20)
                if msg["job_id"] == job_id:
                    seen.append(msg["state"])
            return seen

        on_each = await asyncio.gather(*(states(ws) for ws in held.values()))
        for seen in on_each:
            assert seen[-1] == "SUCCESS" and {"VALIDATING", "PROCESSING", "UPLOADING"} <= set(seen), on_each

        async def one_websocket_each() -> bool:
            async with httpx.AsyncClient() as http:
                scraped = [
                    (await http.get(f"http://127.0.0.1:{p}/metrics")).text for p in (metrics, metrics + 1)
                ]
            return [_websocket_connections(text) for text in scraped] == [1.0, 1.0]

        await wait_until(one_websocket_each, what="each worker's /metrics counts its own websocket")

        proc.kill()  # the supervisor, SIGKILLed: no worker serves on unsupervised
        assert await asyncio.gather(*(_close_code(ws) for ws in held.values())) == [1001, 1001]
        await wait_until(lambda: not any(_alive(pid) for pid in pids), what="the workers leave")


async def test_a_killed_worker_is_replaced_and_every_worker_says_goodbye(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """`--workers 2 --app hostapp:app` (jobwire mounted in a FastAPI app): SIGKILL one worker,
    and the port answers on while another takes its place; SIGTERM the command, and every
    websocket on every worker closes 1001 (jobwire's goodbye, not uvicorn's 1012), and the
    command exits 0."""
    (tmp_path / "hostapp.py").write_text(HOST_MODULE)
    env = _env(JOBWIRE_REDIS_URL=own_redis.url, JOBWIRE_CELERY_APP="jobwire.tasks.demo:app")
    log = tmp_path / "serve.log"
    args = ["--workers", "2", "--app", "hostapp:app"]
    async with _serving(args, env, log, cwd=tmp_path, prefix=PREFIX) as (proc, port, pids):
        os.kill(pids[0], signal.SIGKILL)
        await wait_until(
            lambda: "was killed by SIGKILL; starting another" in log.read_text(), what="the death is said"
        )
        async with httpx.AsyncClient() as http:  # the other worker answers meanwhile
            for _ in range(10):
                assert (await http.get(f"http://127.0.0.1:{port}{PREFIX}/readyz")).status_code == 200
        again = re.compile(r"worker 0 serves again \(pid (\d+)\)")
        await wait_until(lambda: again.search(log.read_text()), what="a new worker serves", timeout=30)
        replaced = again.search(log.read_text())
        assert replaced is not None
        pids = [int(replaced[1]), pids[1]]
        assert pids[0] not in (proc.pid, *pids[1:])

        held = await _one_socket_per_worker(f"ws://127.0.0.1:{port}{PREFIX}/ws", port, pids)
        proc.send_signal(signal.SIGTERM)

        assert await asyncio.gather(*(_close_code(ws) for ws in held.values())) == [1001, 1001]
        assert await asyncio.to_thread(proc.wait, 20) == 0
    said = log.read_text()
    assert "stopping 2 worker processes" in said and "killed" not in said.split("stopping 2")[1]


def test_worker_counts() -> None:
    """`auto` is the cores the process may use; a number is itself; anything else is refused
    with a line naming where it came from. A cgroup's CPU quota (v2 or v1) caps `auto`."""
    assert worker_count("auto", "--workers") == worker_count(" AUTO ", "--workers") == usable_cores() >= 1
    assert worker_count("3", "JOBWIRE_WORKERS") == 3
    for bad in ("0", "-1", "two", "1.5", "", "²"):
        with pytest.raises(SettingsError) as refused:
            worker_count(bad, "JOBWIRE_WORKERS")
        assert str(refused.value) == f"JOBWIRE_WORKERS must be a whole number >= 1 or auto, got {bad!r}"

    assert cores_in_quota("max 100000") is None and cores_in_quota("-1 100000") is None
    assert cores_in_quota("150000 100000") == 2 and cores_in_quota("50000 100000") == 1


def test_a_cgroup_cpu_quota_caps_auto(tmp_path: Path) -> None:
    """The tightest quota of the process's cgroup and those above it, v2 and v1."""
    own = tmp_path / "cgroup"
    v2 = tmp_path / "fs"
    (v2 / "pod" / "app").mkdir(parents=True)
    (v2 / "pod" / "cpu.max").write_text("300000 100000\n")
    (v2 / "pod" / "app" / "cpu.max").write_text("max 100000\n")
    own.write_text("0::/pod/app\n")
    assert cgroup_cpu_quota(v2, own) == 3
    own.write_text("0::/\n")  # inside a container's cgroup namespace: its own at the root
    (v2 / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_quota(v2, own) == 2

    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us").write_text("100000\n")
    own.write_text("12:memory:/docker\n4:cpu,cpuacct:/docker\n")
    assert cgroup_cpu_quota(v1, own) == 3
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1, own) is None
    assert cgroup_cpu_quota(v1, tmp_path / "none") is None


@pytest.mark.parametrize(
    ("args", "variable", "said"), [(["--workers", "0"], "", "--workers"), ([], "lots", "JOBWIRE_WORKERS")]
)
def test_a_bad_worker_count_is_one_line_and_exit_2(args: list[str], variable: str, said: str) -> None:
    done = subprocess.run(
        [*SERVE, *args], env=_env(JOBWIRE_WORKERS=variable), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    value = args[-1] if args else variable
    assert " ".join(lines) == f"jobwire: {said} must be a whole number >= 1 or auto, got {value!r}"
