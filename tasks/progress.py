"""`ProgressTask`: the task base class with `report()`, for progress with a return value.

Tasks of an attached app (`jobwire.attach(app)`) need no base class: their
`self.update_state(state=..., meta=...)` already streams. `ProgressTask` adds:

- `report(state, step=, total=, description=, percent=)`, which returns the event's seq,
  or None once the job is final (revoked), so a long task can stop cooperatively;
- streaming `update_state` for apps that are not attached;
- not running a job that is already final when it reaches a worker (revoked before that
  worker heard the broadcast, or finished and redelivered).
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Ignore

from jobwire.protocol import FINAL_STATES, PENDING, RETRY, STARTED, progress_meta
from jobwire.tasks.backend import CELERY_STATES, JobwireBackendMixin
from jobwire.tasks.recorder import Recorder

#: States `report()` refuses: they belong to the lifecycle, which Celery drives.
RESERVED_STATES = frozenset({PENDING, STARTED, RETRY}) | FINAL_STATES


class ProgressTask(Task):  # type: ignore[misc]
    """Task base class with `report()`. Use as `@app.task(bind=True, base=ProgressTask)`."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The prerun handler saw this job's STARTED refused (it is already final): do not
        # run it again. Ignore leaves Celery's stored result untouched.
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
        if self.request.id is None:  # called directly as a function, not as a task
            return 0
        progress = progress_meta(step, total, description, percent, **extra)
        return Recorder.for_app(self.app).record_state(
            self.request.id, state, progress, self.request, task=self.name, celery_after_final=False
        )

    def store_result(self, data: bytes | str, *, content_type: str, filename: str) -> dict[str, Any]:
        """Put a large result (a PDF, an export) in object storage; return its reference,
        which is what the task should return. Raises `StorageError` if it cannot be
        stored, which fails the job: a reference never points at nothing."""
        from jobwire.tasks.results import store

        if self.request.id is None:
            raise RuntimeError("store_result() is for a running task")
        return store(self.app, self.request.id, data, content_type=content_type, filename=filename)

    def throttle(self, limit: str, *, per: str | None = None, rate: str = "1/s") -> None:
        """Take a token of the distributed rate limit `limit`, or re-schedule this job for
        when one exists (see `jobwire.tasks.throttle`)."""
        from jobwire.tasks.throttle import throttle

        throttle(self, limit, per=per, rate=rate)

    def update_state(
        self, task_id: str | None = None, state: str | None = None, meta: Any = None, **kwargs: Any
    ) -> None:
        """Celery's `update_state`; custom states also stream, in the same round trip."""
        job_id = task_id or self.request.id
        if (
            job_id is None
            or state is None
            or state in CELERY_STATES
            or isinstance(self.backend, JobwireBackendMixin)  # an attached app's backend does it
        ):
            super().update_state(task_id, state, meta, **kwargs)
            return
        request = self.request if job_id == self.request.id else None
        Recorder.for_app(self.app).record_state(
            job_id, state, meta, request, task=self.name if request else None
        )
