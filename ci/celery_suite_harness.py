"""pytest plugin for every run of ci/celery_suite.py, plain and attached alike.

It changes how Celery's integration suite is driven, never what a test asserts:

- `Manager.wait_until_idle()` (the `manager` fixture's teardown) asks the workers for their
  active tasks with `inspect().active()`, which waits its whole 1 s timeout for replies from
  workers it does not know the number of: a second after every test. The suite has one worker
  (`celery_session_worker`), so we ask with `limit=1` and go on once it has answered. The
  code is Celery 5.7's, with that one change.
- Tests Celery marks `flaky(reruns=5)` (meant for its CI's remote services) are rerun at most
  $CELERY_SUITE_MAX_RERUNS times (default 2), so a test broken by a change costs a bounded
  time.
- Past $CELERY_SUITE_DEADLINE seconds after the session started, the tests left are skipped
  with a reason that says so: a run always ends and reports, and ci/celery_suite.py counts
  those tests as not run (a failure of the comparison, not a pass).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from celery.contrib.testing import manager as celery_manager
from kombu.exceptions import ContentDisallowed

DEADLINE_REASON = "celery-suite: the run's deadline passed; not run"
_start = time.monotonic()
_deadline = float(os.environ.get("CELERY_SUITE_DEADLINE") or "inf")
_max_reruns = int(os.environ.get("CELERY_SUITE_MAX_RERUNS") or "2")


def _wait_until_idle(self: Any) -> None:
    control = self.app.control
    with self.app.connection() as connection:
        # Try to purge the queue before we start to attempt to avoid interference from
        # other tests
        while True:
            count = control.purge(connection=connection)
            if count == 0:
                break

        # Wait until worker is idle: the suite's one worker has answered
        inspect = control.inspect(limit=1)
        inspect.connection = connection
        while True:
            try:
                count = sum(len(t) for t in inspect.active().values())
            except ContentDisallowed:
                # test_security_task_done may trigger this exception
                break
            if count == 0:
                break


def pytest_configure(config: pytest.Config) -> None:
    global _start
    _start = time.monotonic()
    celery_manager.ManagerMixin.wait_until_idle = _wait_until_idle


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        mark = item.get_closest_marker("flaky")
        if mark is not None and int(mark.kwargs.get("reruns", 0)) > _max_reruns:
            kwargs = {**mark.kwargs, "reruns": _max_reruns}
            item.add_marker(pytest.mark.flaky(*mark.args, **kwargs), append=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if time.monotonic() - _start > _deadline:
        pytest.skip(DEADLINE_REASON)
