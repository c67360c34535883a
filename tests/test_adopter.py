"""A real adopter: the `examples/shop` Celery project, with jobwire installed from the
repository into a fresh virtualenv, run from outside the repository.

The virtualenv gets jobwire's own wheel (built from this checkout) and nothing else from
it; jobwire's dependencies come from the test environment through a `.pth` line, so the
test does not download them on every run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.clients import LIFECYCLE, assert_gap_free, recv_json
from tests.support import ROOT, RedisServer, free_port, wait_until

pytestmark = pytest.mark.timeout(180)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWIRE_", "PYTHON", "SHOP_"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the jobwire wheel built from this repository."""
    base = tmp_path_factory.mktemp("adopter")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", base / "venv"], check=True)
    wheels = base / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
        check=True,
        cwd=base,
    )
    (wheel,) = wheels.glob("jobwire-*.whl")
    python = base / "venv" / "bin" / "python"
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    )
    (Path(site.decode().strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], check=True
    )
    return base / "venv"


def test_install_puts_one_namespace_in_site_packages(venv: Path, tmp_path: Path) -> None:
    """Only `jobwire` is installed: no `server` or `tasks` to shadow a project's own; the
    dashboard ships as package data."""
    probe = (
        "import importlib.util as u, jobwire.server.app as a;"
        "print(u.find_spec('server'), u.find_spec('tasks'), (a.STATIC_DIR / 'index.html').is_file(),"
        " a.__file__.startswith(__import__('sys').prefix))"
    )
    out = subprocess.check_output([venv / "bin" / "python", "-c", probe], cwd=tmp_path, env=_clean_env())
    assert out.decode().split() == ["None", "None", "True", "True"]


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """The example project, copied away from the repository."""
    return Path(shutil.copytree(ROOT / "examples" / "shop", tmp_path / "shop"))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_shop_streams_seed_style_progress_to_success(
    venv: Path, shop: Path, own_redis: RedisServer, processes: list[subprocess.Popen[bytes]]
) -> None:
    """The shop's worker (`celery -A celeryapp worker`) and `jobwire serve` with
    JOBWIRE_CELERY_APP: a job submitted over REST streams its update_state progress to SUCCESS."""
    env = _clean_env(
        SHOP_BROKER_URL=own_redis.url,  # the broker does not matter here; RabbitMQ has its own test
        SHOP_RESULT_BACKEND=own_redis.url,
        SHOP_QUEUE="shop-adopter",
    )
    log = (shop / "worker.log").open("wb")
    server_log = (shop / "server.log").open("wb")
    # `celery -A celeryapp worker` (the celery script itself is not in this venv: its package is shared)
    worker = [
        venv / "bin" / "python",
        "-m",
        "celery",
        "-A",
        "celeryapp",
        "worker",
        "--pool",
        "prefork",
        "-c",
        "1",
        "-l",
        "INFO",
    ]
    processes.append(
        subprocess.Popen(
            [*worker, "--without-gossip", "--without-mingle"], cwd=shop, env=env, stdout=log, stderr=log
        )
    )
    port = free_port()
    server_env = {
        **env,
        "JOBWIRE_CELERY_APP": "celeryapp:app",
        "JOBWIRE_ALLOWED_TASKS": "tasks.long_running_task",
    }
    processes.append(
        subprocess.Popen(
            [venv / "bin" / "jobwire", "serve", "--port", str(port)],
            cwd=shop,
            env=server_env,
            stdout=subprocess.DEVNULL,
            stderr=server_log,
        )
    )
    url = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{url}/readyz")).status_code == 200
        except httpx.TransportError:
            assert all(p.poll() is None for p in processes), (shop / "server.log").read_text()
            return False

    try:
        await wait_until(ready, what="jobwire serve is ready", timeout=30)
    finally:
        log.close(), server_log.close()  # the children hold their own descriptors
    await wait_until(
        lambda: b"ready." in (shop / "worker.log").read_bytes(), what="the shop worker is ready", timeout=30
    )

    async with httpx.AsyncClient(base_url=url) as http:
        tasks = (await http.get("/api/v1/tasks")).json()["tasks"]
        assert [t["name"] for t in tasks] == ["tasks.long_running_task"]
        refused = await http.post("/api/v1/jobs", json={"task": "tasks.import_orders"})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "task_not_allowed"
        resp = await http.post(
            "/api/v1/jobs", json={"task": "tasks.long_running_task", "kwargs": {"delay": 0.1}}
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]

    events = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/jobs/{job_id}") as ws:
        while not (events and events[-1]["final"]):
            msg = await recv_json(ws, timeout=20)
            if msg["type"] == "event":
                events.append(msg)
    assert [e["state"] for e in events] == LIFECYCLE
    assert_gap_free(events)
    assert events[3]["progress"] == {
        "step": 2,
        "total": 3,
        "description": "Processing data",
        "percent": 66.67,
    }
    assert events[-1]["result"] == {"status": "complete", "items": 0}
    assert time.time() - events[0]["ts"] < 60
