"""pytest plugin: `jobwire.attach()` on every Celery app of Celery's own integration suite.

Loaded by ci/celery_suite.py with `-p jobwire_attach_plugin` for its attached runs; Celery's
files stay as they come in the sdist. An adopter calls `attach(app)` right after configuring
the app, so the suite's two app fixtures (`celery_app` per test, `celery_session_app` for the
worker) are attached as soon as they are built, before any task is published or the worker
starts. Any other app the suite builds is attached when Celery finalizes it
(`celery._state.connect_on_app_finalize`, the hook `shared_task` uses).

The suite's worker runs in the test process (`celery_session_worker`: a worker thread with a
prefork pool), so attaching there covers the worker; each pool child checks on
`worker_process_init` that its app is still attached, and says so.

Every attach, skip and pool-child check is one JSON line in $JOBWIRE_SUITE_ATTACH_LOG and one
line on stderr; ci/celery_suite.py reads the JSON lines to prove the run was attached.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

import pytest
from celery import Celery, _state, signals
from celery.app.backends import by_url
from celery.backends.redis import RedisBackend

import jobwire
from jobwire.tasks import registry

_LOG = os.environ.get("JOBWIRE_SUITE_ATTACH_LOG", "")
_lock = threading.Lock()
_APP_FIXTURES = ("celery_app", "celery_session_app")


def _note(event: str, app: Celery | None, **fields: Any) -> None:
    record = {
        "event": event,
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "app": getattr(app, "main", None),
        "app_id": id(app) if app is not None else None,
        **fields,
    }
    line = json.dumps(record, default=str)
    with _lock:
        print(f"jobwire-suite: {line}", file=sys.__stderr__, flush=True)
        if _LOG:
            with open(_LOG, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _is_redis_backend(app: Celery) -> bool:
    try:
        cls, _ = by_url(app.backend_cls or app.conf.result_backend, app.loader)
    except Exception:  # an unknown or unloadable backend: not one jobwire can attach to
        return False
    return issubclass(cls, RedisBackend)


def attach_app(app: Celery, where: str) -> None:
    """Attach `app` once; assert it took. Apps without a Redis backend (Celery's own fallback
    default app has none) are skipped, and said so: `attach()` refuses them by design."""
    if registry.is_attached(app):
        return
    if not _is_redis_backend(app):
        _note("skipped", app, where=where, backend=app.conf.result_backend)
        return
    jobwire.attach(app)
    assert registry.is_attached(app), f"jobwire.attach() did not register {app!r}"
    _note("attached", app, where=where, backend=app.conf.result_backend)


def _on_finalize(app: Celery) -> None:
    attach_app(app, "finalize")


@signals.worker_process_init.connect(weak=False)
def _pool_child_check(**_: Any) -> None:
    app = _state.get_current_app()
    _note("pool-child", app, attached=registry.is_attached(app))


def pytest_configure(config: pytest.Config) -> None:
    # Before any app of the suite exists: Celery's setup_default_app() restores this set of
    # finalizers after each test app, and so keeps ours.
    _state.connect_on_app_finalize(_on_finalize)
    _note("plugin-loaded", None, jobwire=jobwire.__version__)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    result = yield
    if fixturedef.argname in _APP_FIXTURES and isinstance(result, Celery):
        attach_app(result, f"fixture {fixturedef.argname}")
    return result
