"""What the server asks of Celery: submit and revoke, through the app it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery, Signature, chord, group
from celery.exceptions import TaskRevokedError

from jobwire.protocol import PENDING, REVOKED
from jobwire.tasks.recorder import CALLBACK_ROLE, PARENT_HEADER, ROLE_HEADER, Owner, Parent, Recorder


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


@dataclass(frozen=True)
class Call:
    """One task of a group submit, with the job id it will run as."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    job_id: str


def submit_group(
    app: Celery, group_id: str, children: list[Call], callback: Call | None, owner: Owner | None = None
) -> None:
    """Send `children` as one group job `group_id` (a chord when there is a `callback`),
    blocking: call it from a thread.

    The group's record (PENDING, the child count, the child list) is written first, so
    its aggregate is ready before any child can end. Each child carries the group in its
    headers; its publish records it with its parent, and its end counts in the group's
    aggregate. If sending fails, the group's record goes again.
    """
    app.set_current()
    recorder = Recorder.for_app(app)
    recorder.create_group(
        group_id, "chord" if callback else "group", [c.job_id for c in children], owner=owner
    )
    if callback is not None:
        # Recorded now, not at its publish: when a child fails, Celery fails the callback
        # without ever sending it, and that failure must still find its chord.
        parent = Parent(group_id, CALLBACK_ROLE)
        recorder.record(
            callback.job_id, PENDING, task=callback.name, only_if_new=True, owner=owner, parent=parent
        )
    headers = owner.headers() if owner else {}

    def signature(call: Call, role: str) -> Signature:
        options = {"task_id": call.job_id, "headers": {**headers, PARENT_HEADER: group_id, ROLE_HEADER: role}}
        return app.signature(call.name, args=call.args, kwargs=call.kwargs, **options)

    header = [signature(c, "child") for c in children]
    try:
        if callback is None:
            group(header).apply_async()
        else:
            chord(header)(signature(callback, CALLBACK_ROLE))
    except BaseException:
        recorder.forget(group_id)
        raise


def revoke_job(app: Celery, job_id: str, *, reason: str = "revoked by request") -> int | None:
    """Mark a job REVOKED now and tell workers to drop or terminate it.

    Recorded here rather than waiting for a worker, because a queued job may sit for a
    long time (or forever, with no worker up) before a worker sees the revoke; the record
    script refuses it if the job already finished, and then nothing is sent.
    Returns the REVOKED event's seq, or None if the job was already final.
    """
    recorder = Recorder.for_app(app)
    seq = _record_revoked(app, recorder, job_id, reason)
    if seq is not None:
        # A group's children go with it (their ends no longer count: the group is final).
        children = [c.decode() for c in recorder.client.lrange(recorder.keys.children(job_id), 0, -1)]
        for child in children:
            _record_revoked(app, recorder, child, reason)
        app.control.revoke([job_id, *children], terminate=True, signal="SIGTERM")
    return seq


def _record_revoked(app: Celery, recorder: Recorder, job_id: str, reason: str) -> int | None:
    """REVOKED in jobwire's stream and in Celery's result: one write when Celery's results
    share jobwire's Redis, Celery's own call otherwise (a cluster)."""
    error = {"type": "TaskRevokedError", "message": reason}
    meta = recorder.celery_meta(job_id, REVOKED, TaskRevokedError(reason), None)
    seq = recorder.record(job_id, REVOKED, error=error, celery_meta=meta)
    if seq is not None and meta is None:
        app.backend.mark_as_revoked(job_id, reason)
    return seq
