"""Lifecycle events for every task of an attached app, from Celery's signals.

Connected by the first `jobwire.attach()` (never by an import), and each handler acts only
for tasks of an attached app, or with `base=ProgressTask`.

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
  has stored the result. REVOKED: `task_revoked` in the worker, and
  `jobwire.tasks.control.revoke_job` for jobs no worker holds yet.

Every event names the job's owner, from the message's headers (`jobwire_tenant`,
`jobwire_sub`), which the publish signal fills in when the publisher did not: from a
`jobwire.owner()` block, the publishing task's own owner, or `attach(app, owner=...)`
(see `_owner`). The record script sets an owner only when an event creates the job, so
for a job that exists this is ignored; for one whose record was lost (Redis restarted
without persistence), the worker's next event recreates it with its owner, and the
owning tenant can still read it. It costs no round trip: the owner rides in the script's
arguments.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Task, current_task
from celery.signals import (
    before_task_publish,
    task_failure,
    task_prerun,
    task_revoked,
    task_success,
    worker_ready,
)

from jobwire.owner import check_owner, current_owner
from jobwire.protocol import FAILURE, PENDING, RETRY, REVOKED, STARTED, SUCCESS, error_from_celery
from jobwire.tasks import registry
from jobwire.tasks.recorder import (
    PARENT_HEADER,
    ROLE_HEADER,
    SUBJECT_HEADER,
    TENANT_HEADER,
    Owner,
    Parent,
    Recorder,
    owner_of,
)

log = logging.getLogger(__name__)

_connected = False


def connect() -> None:
    """Connect the handlers (once per process; `attach()` calls this)."""
    global _connected
    if _connected:
        return
    _connected = True
    before_task_publish.connect(_on_publish, weak=False)
    task_prerun.connect(_on_prerun, weak=False)
    task_success.connect(_on_success, weak=False)
    task_failure.connect(_on_failure, weak=False)
    task_revoked.connect(_on_revoked, weak=False)
    worker_ready.connect(_on_worker_ready, weak=False)


def _tracked(task: Task | None) -> bool:
    if task is None or not _user_task(task.name):
        return False
    from jobwire.tasks.progress import ProgressTask  # progress imports the recorder too

    return registry.is_attached(task.app) or isinstance(task, ProgressTask)


def _user_task(name: str | None) -> bool:
    # Celery's own housekeeping tasks (chord_unlock, backend_cleanup) are not user jobs.
    return bool(name) and not str(name).startswith("celery.")


def _safely(fn: Callable[..., None]) -> Callable[..., None]:
    """Signal handlers must never break the task or the publish they observe."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("jobwire: could not record %s", fn.__name__)

    wrapper.__name__ = fn.__name__
    return wrapper


@_safely
def _on_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    headers = headers or {}
    job_id, name = headers.get("id"), headers.get("task") or sender
    app = registry.publishing_app()
    if not job_id or not _user_task(name) or app is None:
        return
    if headers.get("jobwire_throttled"):
        return  # a rate-limited job re-scheduled: not a new job, not a retry
    recorder = Recorder.for_app(app)
    retries = int(headers.get("retries") or 0)
    owner = _owner(headers, app)
    if retries == 0:
        recorder.record(job_id, PENDING, task=name, only_if_new=True, owner=owner, parent=_parent(headers))
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
        error=error_from_celery(exc) if exc is not None else None,
        owner=owner,
    )


def _parent(headers: dict[str, Any]) -> Parent | None:
    """The group or chord the job was submitted in (the server's group submit sets it)."""
    parent = headers.get(PARENT_HEADER)
    return Parent(str(parent), str(headers.get(ROLE_HEADER) or "child")) if parent else None


def _owner(headers: dict[str, Any], app: Any) -> Owner | None:
    """The job's owner, first found of:

    1. the message's own headers (an explicit `headers=`, or the server's submit);
    2. the innermost `jobwire.owner()` block around the publish (`jobwire.owner`);
    3. the task publishing it from a worker, whose ownership its children inherit;
    4. the app's `attach(app, owner=...)` callable, asked at publish time.

    An owner found past the first step is written into the headers, so the worker's
    events name it too (`owner_of`) and the job's own children inherit it."""
    tenant, subject = headers.get(TENANT_HEADER), headers.get(SUBJECT_HEADER)
    if tenant:
        return Owner(str(tenant), str(subject or ""))
    found = current_owner() or _inherited() or _derived(app)
    if found is None:
        return None
    owner = Owner(*found)
    headers.update(owner.headers())
    return owner


def _inherited() -> tuple[str, str] | None:
    parent = getattr(current_task, "request", None)
    tenant = getattr(parent, TENANT_HEADER, None)
    return (str(tenant), str(getattr(parent, SUBJECT_HEADER, None) or "")) if tenant else None


def _derived(app: Any) -> tuple[str, str] | None:
    """What the app's owner callable says. A callable that raises or answers something
    that is no owner leaves the job without one (said in the log): the publish and the
    job's PENDING go ahead, as for any app without a callable."""
    derive = getattr(app, "_jobwire_owner", None)
    if derive is None:
        return None
    try:
        found = derive()
        if found is None:
            return None
        if not isinstance(found, tuple) or len(found) != 2:
            raise ValueError(f"must return (tenant, sub) or None, got {found!r:.80}")
        check_owner(*found)
    except Exception as exc:
        log.error("jobwire: the owner callable %r failed, so this job has no owner: %s", derive, exc)
        return None
    return found


@_safely
def _on_prerun(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    if task_id and task is not None and _tracked(task):
        seq = Recorder.for_app(task.app).record(
            task_id, STARTED, task=task.name, owner=owner_of(task.request)
        )
        # Refused only when the job is already final; ProgressTask then skips the body.
        task.request.jobwire_already_final = seq is None


@_safely
def _on_success(sender: Task | None = None, result: Any = None, **_: Any) -> None:
    if sender is None or not _tracked(sender) or sender.request.id is None:
        return
    # The reference, when the backend stored a big result in object storage.
    if getattr(sender.request, "jobwire_final_recorded", False):
        return  # a chord's header task: recorded when its result was stored
    result = getattr(sender.request, "jobwire_result", result)
    Recorder.for_app(sender.app).record(
        sender.request.id, SUCCESS, result=result, task=sender.name, owner=owner_of(sender.request)
    )


@_safely
def _on_failure(
    sender: Task | None = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    if sender is None or task_id is None or not _tracked(sender):
        return
    if getattr(sender.request, "jobwire_final_recorded", False):
        return  # a chord's header task: recorded when its failure was stored
    error = error_from_celery(exception) if exception is not None else {"type": "Error", "message": ""}
    Recorder.for_app(sender.app).record(
        task_id, FAILURE, error=error, task=sender.name, owner=owner_of(sender.request)
    )


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
    if sender is None or job_id is None or not _tracked(sender):
        return
    if expired:
        message = "expired before a worker ran it"
    elif terminated:
        message = f"terminated by signal {signum}"
    else:
        message = "revoked before it started"
    error = {"type": "TaskRevokedError", "message": message}
    Recorder.for_app(sender.app).record(
        job_id, REVOKED, error=error, task=sender.name, owner=owner_of(request)
    )


@_safely
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    if sender is not None and registry.is_attached(sender.app):
        from jobwire.tasks.celery_limits import apply_wanted

        apply_wanted(sender)
