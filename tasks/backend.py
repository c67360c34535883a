"""Celery's Redis result backends, with custom states written by jobwire's record script.

`attach(app)` makes the app use these classes for its `redis://`, `rediss://` and
`sentinel://` result backends. They change one thing: storing a custom state (anything
outside Celery's own lifecycle states, e.g. `update_state(state="VALIDATING", meta=...)`)
writes Celery's result key and jobwire's event in one atomic round trip, instead of
Celery's GET-then-SET. So code written the way Celery documents it streams progress with
no change, and `AsyncResult(id).state/.info` read exactly what it stored.

Lifecycle states (STARTED, SUCCESS, RETRY ...) are stored by Celery as usual; jobwire
records their events from signals (see `jobwire.tasks.signals`). A SUCCESS result too big
for Redis is stored in object storage first, Celery keeps a reference, and reading it
through Celery brings the value back (`jobwire.tasks.results`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend

from jobwire.protocol import error_from_celery

log = logging.getLogger(__name__)

#: Celery's own states; anything else a task stores is a custom (progress) state.
CELERY_STATES = frozenset(states.ALL_STATES) | {states.IGNORED}


class JobwireBackendMixin:
    """Routes custom states through jobwire's recorder (see module docstring).

    Whatever jobwire's own write does, Celery's result is stored as Celery would store it:
    a failed event write (Redis unreachable past the recorder's retry window) is logged and
    Celery's write goes ahead, so a task never fails or hangs because of jobwire.
    """

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        from jobwire.tasks.recorder import Recorder, owner_of

        if state == states.SUCCESS:
            # A result too big for Redis goes to object storage first (failing the job if
            # it cannot be stored); Celery keeps a reference it reads the value back
            # through (`meta_from_decoded`), and the SUCCESS event carries it.
            from jobwire.tasks.results import offload

            result = offload(self, task_id, result)
            if request is not None:
                request.jobwire_result = result
        same_job = request is not None and getattr(request, "id", None) == task_id
        if same_job and state in (states.SUCCESS, states.FAILURE) and getattr(request, "chord", None):
            # A chord's header task: its end must count in the chord before Celery, right
            # after this write, runs the callback (or fails it). The signal, which records
            # other tasks' ends, then knows it is done (`jobwire_final_recorded`).
            fields = {"result": result} if state == states.SUCCESS else {"error": error_from_celery(result)}
            recorded = _safely(
                Recorder.for_app(self.app).record,  # type: ignore[attr-defined]
                task_id,
                state,
                task=getattr(request, "task", None),
                owner=owner_of(request),
                **fields,
            )
            request.jobwire_final_recorded = recorded
        if state in CELERY_STATES:
            stored = super()._store_result(task_id, result, state, traceback, request, **kwargs)  # type: ignore[misc]
            if state == states.FAILURE and not same_job:
                # Celery failing a task that never ran: a chord's callback after a header
                # task failed (ChordError). No signal tells of it; this write is the news.
                error = error_from_celery(result)
                _safely(Recorder.for_app(self.app).record, task_id, state, error=error)  # type: ignore[attr-defined]
            return stored
        task = getattr(request, "task", None) if same_job else None
        if not _safely(Recorder.for_app(self.app).record_state, task_id, state, result, request, task=task):  # type: ignore[attr-defined]
            super()._store_result(task_id, result, state, traceback, request, **kwargs)  # type: ignore[misc]
        return result

    def meta_from_decoded(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Celery's decoding of a stored result, with an offloaded value read back."""
        meta = super().meta_from_decoded(meta)  # type: ignore[misc]
        if meta.get("status") == states.SUCCESS:
            from jobwire.tasks.results import is_offloaded, load

            if is_offloaded(meta.get("result")):
                meta["result"] = load(self, meta["result"])
        return meta


def _safely(record: Any, *args: Any, **kwargs: Any) -> bool:
    """Run a recorder call; False when it failed (logged), so Celery's write goes ahead."""
    try:
        record(*args, **kwargs)
    except Exception:  # noqa: BLE001 - jobwire must never fail a task Celery would run
        job_id, state = args[0], args[1]
        log.exception("jobwire: could not record %s for job %r; Celery stores its result", state, job_id)
        return False
    return True


class JobwireRedisBackend(JobwireBackendMixin, RedisBackend):  # type: ignore[misc]
    """`redis://` and `rediss://` results, custom states through jobwire."""


class JobwireSentinelBackend(JobwireBackendMixin, SentinelBackend):  # type: ignore[misc]
    """`sentinel://` results, custom states through jobwire."""


#: The aliases `attach()` puts in the app's `loader.override_backends`.
BACKEND_ALIASES = {
    "redis": f"{__name__}:JobwireRedisBackend",
    "rediss": f"{__name__}:JobwireRedisBackend",
    "sentinel": f"{__name__}:JobwireSentinelBackend",
}
