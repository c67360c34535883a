"""Progress reporting for tasks, and lifecycle events for every task.

`ProgressTask.report()` is the one call a task makes to show progress. Lifecycle events
(PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED) come from Celery signals, so ordinary
tasks get them without code changes; this module connects them when imported (the app
factory imports it).

Where each lifecycle event is recorded, and why there:

- PENDING: `before_task_publish`, in the publishing process, *before* the message leaves,
  so the job exists (and is watchable) before any worker can start it. Only if new: a
  retry republishes the same id and must not reset the job.
- RETRY: also `before_task_publish` (a republish with `retries > 0`). Recording it there,
  before the new message is sent, guarantees RETRY precedes the next attempt's STARTED;
  the `task_retry` signal fires only after the republish, when a fast worker may already
  have started the retry.
- STARTED: `task_prerun`. If the job is already final there (revoked before this worker
  heard the broadcast, or finished and redelivered), a `ProgressTask` does not run its
  body. SUCCESS / FAILURE: `task_success` / `task_failure`, which Celery sends after it
  has stored the result. REVOKED: `task_revoked` in the worker, and the
  server's revoke (`revoke_job`) for jobs no worker holds yet.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task, current_app
from celery.exceptions import Ignore, TaskRevokedError
from celery.signals import (
    before_task_publish,
    task_failure,
    task_prerun,
    task_revoked,
    task_success,
)

from jobwire.protocol import (
    FAILURE,
    FINAL_STATES,
    PENDING,
    RETRY,
    REVOKED,
    STARTED,
    SUCCESS,
    progress_meta,
)
from tasks.recorder import Recorder

log = logging.getLogger(__name__)

#: States `report()` refuses: they belong to the lifecycle, which Celery drives.
RESERVED_STATES = frozenset({PENDING, STARTED, RETRY}) | FINAL_STATES


class ProgressTask(Task):  # type: ignore[misc]
    """Task base class with `report()`. Use as `@shared_task(bind=True, base=ProgressTask)`."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A job already final when it reaches a worker (revoked before this worker could
        # hear the revoke broadcast, or finished and redelivered) must not run again: the
        # prerun handler saw its STARTED refused. Ignore leaves Celery's result untouched.
        if getattr(self.request, "jobwire_already_final", False):
            raise Ignore()
        return super().__call__(*args, **kwargs)

    def report(
        self,
        state: str,
        *,
        step: int | None = None,
        total: int | None = None,
        description: str | None = None,
        percent: float | None = None,
        **extra: Any,
    ) -> int | None:
        """Report a custom state with progress; return the event's seq.

        `percent` defaults to step/total; see `jobwire.protocol.progress_meta`.

        Updates Celery's result backend (`AsyncResult(id).state == state`, `.info` is
        the progress dict) and jobwire's history and live channels in one Redis round
        trip. Returns None when the job is already final (revoked), so a long task can
        stop cooperatively: ``if self.report(...) is None: return``. Called outside a
        task (as a plain function, e.g. in your unit tests) it records nothing and
        returns 0.
        """
        if not isinstance(state, str) or not state or state in RESERVED_STATES:
            raise ValueError(
                f"report() takes a custom state name, got {state!r}; "
                f"{sorted(RESERVED_STATES)} are set by the task lifecycle"
            )
        job_id = self.request.id
        if job_id is None:  # called directly as a function, not as a task
            return 0
        progress = progress_meta(step, total, description, percent, **extra)
        recorder = Recorder.for_app(self.app)
        meta = recorder.celery_meta(job_id, state, progress, self.request)
        if meta is None:
            # Another backend cannot share the round trip; keep Celery's view correct anyway.
            self.update_state(state=state, meta=progress)
        return recorder.record(job_id, state, progress=progress, task=self.name, celery_meta=meta)


def revoke_job(app: Celery, job_id: str, *, reason: str = "revoked by request") -> int | None:
    """Mark a job REVOKED now and tell workers to drop or terminate it.

    Recorded here rather than waiting for a worker, because a queued job may sit for a
    long time (or forever, with no worker up) before a worker sees the revoke; the record
    script refuses it if the job already finished, and then nothing is sent.
    Returns the REVOKED event's seq, or None if the job was already final.
    """
    recorder = Recorder.for_app(app)
    error = {"type": "TaskRevokedError", "message": reason}
    meta = recorder.celery_meta(job_id, REVOKED, TaskRevokedError(reason), None)
    seq = recorder.record(job_id, REVOKED, error=error, celery_meta=meta)
    if seq is not None:
        app.control.revoke(job_id, terminate=True, signal="SIGTERM")
    return seq


def _tracked(name: str | None) -> bool:
    # Celery's own housekeeping tasks (chord_unlock, backend_cleanup) are not user jobs.
    return bool(name) and not str(name).startswith("celery.")


def _error(exc: BaseException) -> dict[str, str]:
    """What clients learn of a failure: the type and message, never the traceback."""
    return {"type": type(exc).__name__, "message": str(exc)}


def _safely(fn: Any) -> Any:
    """Signal handlers must never break the task or the publish they observe."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("jobwire: could not record %s", fn.__name__)

    wrapper.__name__ = fn.__name__
    return wrapper


@before_task_publish.connect(weak=False)
@_safely
def _on_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    headers = headers or {}
    job_id, name = headers.get("id"), headers.get("task") or sender
    if not job_id or not _tracked(name):
        return
    recorder = Recorder.for_app(current_app)
    retries = int(headers.get("retries") or 0)
    if retries == 0:
        recorder.record(job_id, PENDING, task=name, only_if_new=True)
        return
    eta = headers.get("eta")
    countdown = None
    if eta:
        when = datetime.fromisoformat(eta)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        countdown = round(max(0.0, (when - datetime.now(UTC)).total_seconds()), 3)
    # Task.retry() is nearly always called in an `except` block: that is the reason.
    exc = sys.exc_info()[1]
    recorder.record(
        job_id,
        RETRY,
        task=name,
        retry={"attempt": retries, "countdown": countdown, "eta": eta},
        error=_error(exc) if exc is not None else None,
    )


@task_prerun.connect(weak=False)
@_safely
def _on_prerun(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    if task_id and task is not None and _tracked(task.name):
        seq = Recorder.for_app(task.app).record(task_id, STARTED, task=task.name)
        # Refused only when the job is already final; ProgressTask then skips the body.
        task.request.jobwire_already_final = seq is None


@task_success.connect(weak=False)
@_safely
def _on_success(sender: Task | None = None, result: Any = None, **_: Any) -> None:
    if sender is None or not _tracked(sender.name) or sender.request.id is None:
        return
    Recorder.for_app(sender.app).record(sender.request.id, SUCCESS, result=result, task=sender.name)


@task_failure.connect(weak=False)
@_safely
def _on_failure(
    sender: Task | None = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    if sender is None or task_id is None or not _tracked(sender.name):
        return
    error = _error(exception) if exception is not None else {"type": "Error", "message": ""}
    Recorder.for_app(sender.app).record(task_id, FAILURE, error=error, task=sender.name)


@task_revoked.connect(weak=False)
@_safely
def _on_revoked(
    sender: Task | None = None,
    request: Any = None,
    terminated: bool = False,
    expired: bool = False,
    signum: Any = None,
    **_: Any,
) -> None:
    job_id = getattr(request, "id", None)
    if sender is None or job_id is None or not _tracked(sender.name):
        return
    if expired:
        message = "expired before a worker ran it"
    elif terminated:
        message = f"terminated by signal {signum}"
    else:
        message = "revoked before it started"
    error = {"type": "TaskRevokedError", "message": message}
    Recorder.for_app(sender.app).record(job_id, REVOKED, error=error, task=sender.name)
