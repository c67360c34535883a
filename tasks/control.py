"""What the server asks of Celery: submit and revoke, through the app it serves."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import TaskRevokedError

from jobwire.protocol import REVOKED
from jobwire.tasks.recorder import Owner, Recorder


def submit(
    app: Celery, name: str, args: list[Any], kwargs: dict[str, Any], job_id: str, owner: Owner | None = None
) -> None:
    """Send task `name` as job `job_id` (blocking: call it from a thread).

    The app is made current in the calling thread first, so the publish signal records
    PENDING for this app whatever else the process holds. If the send fails, nothing of
    the job is left behind.
    """
    app.set_current()
    try:
        app.send_task(
            name, args=args, kwargs=kwargs, task_id=job_id, headers=owner.headers() if owner else None
        )
    except BaseException:
        # The message never left (broker down, arguments it cannot encode): the PENDING
        # recorded at publish must not outlive it as an orphan job.
        Recorder.for_app(app).forget(job_id)
        raise


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
