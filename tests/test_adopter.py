"""A real adopter: jobwire's wheel, built from this checkout, installed as `pip install
jobwire` would install it (no extras) into a fresh virtualenv that sees nothing of the test
environment; then the `examples/shop` Celery project run from outside the repository.

The virtualenv has no system site-packages and no path borrowed from this environment: its
dependencies come from the package index (pip's cache makes reruns fast), so a core
dependency missing from pyproject.toml fails here.
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
import orjson
import pytest
import websockets

from tests.clients import LIFECYCLE, assert_gap_free, recv_json
from tests.support import ROOT, RedisServer, free_port, wait_until

# A cold pip cache downloads the core's ~50 wheels once, in the first test's setup.
pytestmark = pytest.mark.timeout(300)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWIRE_", "PYTHON", "SHOP_"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the jobwire wheel built from this repository and its core
    dependencies from the index."""
    base = tmp_path_factory.mktemp("adopter")
    # --without-pip: this environment's pip installs into it (`pip --python`), which saves
    # bootstrapping a pip of its own; nothing of this environment is visible inside.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", base / "venv"], check=True)
    wheels = base / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
        check=True,
        cwd=base,
    )
    (wheel,) = wheels.glob("jobwire-*.whl")
    python = base / "venv" / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", wheel], check=True, cwd=base, env=_clean_env())
    return base / "venv"


def _python(venv: Path, code: str, cwd: Path) -> str:
    done = subprocess.run(
        [venv / "bin" / "python", "-c", code], cwd=cwd, env=_clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_virtualenv_sees_nothing_of_the_test_environment(venv: Path, tmp_path: Path) -> None:
    """No borrowed site-packages: the test environment's packages (pytest, the dev extra)
    cannot be imported, and its site-packages is not on the path."""
    probe = "import sys, importlib.util as u; print(sys.path); print(u.find_spec('pytest') is None)"
    path, no_pytest = _python(venv, probe, tmp_path).splitlines()
    assert sysconfig.get_paths()["purelib"] not in path
    assert no_pytest == "True"


def test_install_puts_one_namespace_in_site_packages(venv: Path, tmp_path: Path) -> None:
    """Only `jobwire` is installed: no `server` or `tasks` to shadow a project's own; the
    dashboard ships as package data."""
    probe = (
        "import importlib.util as u, jobwire.server.app as a;"
        "print(u.find_spec('server'), u.find_spec('tasks'), (a.STATIC_DIR / 'index.html').is_file(),"
        " a.__file__.startswith(__import__('sys').prefix))"
    )
    assert _python(venv, probe, tmp_path).split() == ["None", "None", "True", "True"]


def test_core_install_imports_every_module_without_the_extras(venv: Path, tmp_path: Path) -> None:
    """Every module of the package imports with the core dependencies alone; boto3 (`[s3]`)
    and reportlab (`[demo]`) are not installed."""
    probe = (
        "import importlib, importlib.util as u, pkgutil, jobwire\n"
        "for m in pkgutil.walk_packages(jobwire.__path__, 'jobwire.'):\n"
        "    importlib.import_module(m.name)\n"
        "print([name for name in ('boto3', 'botocore', 'reportlab') if u.find_spec(name)])\n"
    )
    assert _python(venv, probe, tmp_path).strip() == "[]"


def test_attach_on_a_celery_app_with_a_redis_backend(venv: Path, tmp_path: Path) -> None:
    code = (
        "from celery import Celery\n"
        "import jobwire\n"
        "from jobwire.tasks import registry\n"
        "app = Celery('adopter', broker='redis://127.0.0.1:1/0', backend='redis://127.0.0.1:1/0')\n"
        "assert jobwire.attach(app) is app and registry.is_attached(app)\n"
        "print('attached')\n"
    )
    assert _python(venv, code, tmp_path).strip() == "attached"


def test_cli_help(venv: Path, tmp_path: Path) -> None:
    """`jobwire --help` and each command's help: the CLI and its client are core."""
    for args in ([], ["serve"], ["watch"], ["submit"], ["status"]):
        done = subprocess.run(
            [venv / "bin" / "jobwire", *args, "--help"], cwd=tmp_path, env=_clean_env(), capture_output=True
        )
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.startswith(b"usage: jobwire"), done.stdout


def test_demo_pdf_without_the_demo_extra_names_it(venv: Path, tmp_path: Path) -> None:
    """The demo's PDF task fails, without reportlab, with the install command; nothing else needs it."""
    code = (
        "from jobwire.tasks.examples import generate_report\n"
        "try:\n"
        "    generate_report(None)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert "pip install 'jobwire[demo]'" in _python(venv, code, tmp_path)


def test_the_s3_store_without_the_s3_extra_says_so_in_one_line(venv: Path, tmp_path: Path) -> None:
    """`jobwire serve` asked for the S3 store without boto3 stops with the install command,
    not a traceback at startup."""
    env = _clean_env(JOBWIRE_RESULT_STORE="s3", JOBWIRE_S3_BUCKET="results")
    done = subprocess.run(
        [venv / "bin" / "jobwire", "serve"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'jobwire[s3]'" in done.stderr and "Traceback" not in done.stderr


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
    JOBWIRE_CELERY_APP: a job submitted over REST streams its update_state progress to
    SUCCESS, and `jobwire watch` follows it to its exit code."""
    env = _clean_env(
        SHOP_BROKER_URL=own_redis.url,  # the broker does not matter here; RabbitMQ has its own test
        SHOP_RESULT_BACKEND=own_redis.url,
        SHOP_QUEUE="shop-adopter",
    )
    log = (shop / "worker.log").open("wb")
    server_log = (shop / "server.log").open("wb")
    worker = [
        venv / "bin" / "celery",
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
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        # The npm package's scripts and the dashboard come with the wheel.
        for script in ("/jobwire.js", "/jobwire-progress.js", "/dashboard.js"):
            answer = await http.get(script)
            assert answer.status_code == 200 and "javascript" in answer.headers["content-type"], script
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

    # The CLI replays the finished job from its first event and exits 0 for SUCCESS.
    watched = subprocess.run(
        [venv / "bin" / "jobwire", "--url", url, "watch", job_id],
        cwd=shop,
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert watched.returncode == 0, watched.stderr.decode()
    assert orjson.loads(watched.stdout) == {
        "job_id": job_id,
        "state": "SUCCESS",
        "result": {"status": "complete", "items": 0},
    }
