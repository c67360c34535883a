"""Demo tasks, submittable by these exact names. Each takes `delay` (seconds per step)
so demos and tests can watch them move."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from tasks.progress import ProgressTask

MAX_DELAY = 60.0


def _check_delay(delay: Any) -> float:
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise TypeError(f"delay must be a number of seconds, got {delay!r}")
    if not 0 <= delay <= MAX_DELAY:
        raise ValueError(f"delay must be between 0 and {MAX_DELAY} seconds, got {delay}")
    return float(delay)


@shared_task(bind=True, base=ProgressTask, name="long_running_task")
def long_running_task(self: ProgressTask, delay: float = 1.0) -> dict[str, Any]:
    """Validates, processes and uploads, reporting each step (VALIDATING → PROCESSING → UPLOADING)."""
    delay = _check_delay(delay)
    steps = [
        ("VALIDATING", "Validating input"),
        ("PROCESSING", "Processing data"),
        ("UPLOADING", "Uploading results"),
    ]
    started = time.time()
    for step, (state, description) in enumerate(steps, start=1):
        # `step` names the step in progress; percent counts the steps already done.
        done = 100.0 * (step - 1) / len(steps)
        if self.report(state, step=step, total=len(steps), description=description, percent=done) is None:
            return {"status": "cancelled", "steps": step - 1}
        time.sleep(delay)
    return {"status": "done", "steps": len(steps), "seconds": round(time.time() - started, 3)}


@shared_task(bind=True, base=ProgressTask, name="failing_task")
def failing_task(self: ProgressTask, delay: float = 1.0) -> None:
    """Processes one step, then fails with a clear error."""
    delay = _check_delay(delay)
    self.report("PROCESSING", step=1, total=2, description="Processing data", percent=0)
    time.sleep(delay)
    raise ValueError("Simulated failure: the input file is corrupt at row 42")


@shared_task(bind=True, base=ProgressTask, name="retrying_task", max_retries=3)
def retrying_task(self: ProgressTask, delay: float = 1.0, failures: int = 1) -> dict[str, Any]:
    """Fails its first `failures` attempts with a transient error, retrying after `delay`."""
    delay = _check_delay(delay)
    self.report("PROCESSING", step=1, total=1, description=f"Attempt {self.request.retries + 1}", percent=0)
    time.sleep(delay)
    if self.request.retries < failures:
        try:
            raise ConnectionError("Upstream service unavailable")
        except ConnectionError as exc:
            raise self.retry(exc=exc, countdown=delay) from exc
    return {"status": "done", "attempts": self.request.retries + 1}


@shared_task(name="plain_sum")
def plain_sum(numbers: list[float], delay: float = 0.0) -> float:
    """An ordinary Celery task (no jobwire base class): it still gets lifecycle events."""
    time.sleep(_check_delay(delay))
    return float(sum(numbers))
