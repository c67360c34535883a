"""Fixtures: a private redis-server, a real Celery worker, a real uvicorn server.

The worker and its Redis live for the whole session (starting a worker takes seconds);
tests isolate themselves by job id, never by flushing (flushing would delete the broker's
queue bindings under the running worker). Tests that stop Redis get a Redis of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# anyio's and hypothesis's pytest plugins make pytest rewrite all of their packages as they
# are imported, and both import modules lazily, deep in a stack (a request; the session's
# end), where compiling them trips a CPython 3.11.7 bug ("AST constructor recursion depth
# mismatch"). Imported here, at the top of the stack.
import anyio._backends._asyncio  # noqa: F401
import anyio._core._fileio  # noqa: F401
import hypothesis  # noqa: F401
import hypothesis.internal.observability  # noqa: F401
import pytest
import redis

from jobwire.settings import Settings
from tests.support import RedisServer, RunningServer, Worker, redis_server, run_server, settings_for

if TYPE_CHECKING:
    from playwright.async_api import Browser


@pytest.fixture(scope="session")
def session_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def result_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file result store the session's worker and servers share."""
    return Path(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="session")
def worker(
    session_redis: RedisServer, result_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    log = Path(tmp_path_factory.mktemp("worker")) / "worker.log"
    w = Worker(session_redis.url, log, env={"JOBWIRE_RESULT_DIR": str(result_dir)})
    w.start()
    yield w
    w.stop()


@pytest.fixture
def settings(session_redis: RedisServer, result_dir: Path) -> Settings:
    return settings_for(session_redis.url, heartbeat_interval=2.0, result_dir=str(result_dir))


@pytest.fixture
async def server(settings: Settings, worker: Worker) -> AsyncIterator[RunningServer]:
    """A server wired to the session Redis, with a worker consuming its jobs."""
    async with run_server(settings) as running:
        yield running


@pytest.fixture
def rclient(session_redis: RedisServer) -> Iterator[redis.Redis]:
    client = session_redis.client()
    yield client
    client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test alone uses, free to be stopped and restarted."""
    with redis_server() as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless Chromium, for every browser test.

    tests/test_browser.py's rules are imported here, when a test asks for a browser, not
    when this file loads: JOBWIRE_SKIP_BROWSER then skips the browser tests alone (a failure
    in CI), and a missing Chromium fails them instead of passing silently."""
    from playwright.async_api import async_playwright

    from tests.test_browser import ARGS, CHROMIUM

    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        await launched.close()
