"""Writes the events of an attached app's jobs to Redis, from workers and publishers.

Each event costs one round trip: the Lua script allocates the seq, updates the job hash
and the bounded history, publishes on the job's and the all-jobs channel, and (for custom
progress states) writes Celery's own result key too, so `AsyncResult(id).state/info`
keeps working for plain Celery code. What the script takes, what it replies and the steps
around it (indexing a new job, counting a child in its group) are `jobwire.record`'s, which
the server's bridge follows too: this module adds the Redis client, retries through a
failover, and Celery's own write when it cannot ride along.

The recorder is synchronous because Celery workers and publishers are; the async server
calls it through a thread when it must write (revoke, submit).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Celery
from celery.backends.redis import RedisBackend

from jobwire import scripts
from jobwire.backoff import backoff
from jobwire.protocol import (
    CALLBACK_ROLE,
    PARENT_HEADER,
    PENDING,
    ROLE_HEADER,
    SUBJECT_HEADER,
    TENANT_HEADER,
    progress_from_meta,
)
from jobwire.record import (
    MISSING,
    CeleryMeta,
    Owner,
    Parent,
    RecordCall,
    RecordReply,
    index_commands,
    parent_call,
    parse_reply,
    record_call,
)
from jobwire.redis_clients import is_transient, sync_client
from jobwire.settings import Settings
from jobwire.tasks import registry
from jobwire.tasks.backend import JobwireBackendMixin

# The record contract (`Owner`, `Parent`, `CeleryMeta`, the header and role names) moved to
# `jobwire.record` and `jobwire.protocol`, so that the server follows it without importing
# the worker's package; tasks/* modules and tests still import these names from here.
__all__ = [
    "CALLBACK_ROLE",
    "PARENT_HEADER",
    "ROLE_HEADER",
    "SUBJECT_HEADER",
    "TENANT_HEADER",
    "CeleryMeta",
    "Owner",
    "Parent",
    "Recorder",
    "owner_of",
    "redis_client_for",
]

log = logging.getLogger(__name__)


def owner_of(request: Any) -> Owner | None:
    """The owner a task's message carries (Celery puts its headers on the request), for
    every event recorded about it: the record script sets an owner only when an event
    creates the job, so this changes nothing for a job that exists, and restores the owner
    of one whose record was lost (a Redis restart without persistence) and comes back with
    this event. None when the message names no owner, or outside a task."""
    tenant = getattr(request, TENANT_HEADER, None)
    return Owner(str(tenant), str(getattr(request, SUBJECT_HEADER, None) or "")) if tenant else None


class Recorder:
    """Records events for one Celery app's jobs (see module docstring)."""

    def __init__(self, client: redis.Redis, settings: Settings, *, app: Celery | None = None) -> None:
        self.client = client
        self.settings = settings
        self.keys = settings.keys
        self._record = client.register_script(scripts.RECORD)
        self._app = app
        # Decided once: Celery's result write can ride in our round trip only when its
        # backend is this Redis (`for_app` then hands us the backend's own client), which
        # a cluster never is: Celery's Redis backend does not support Redis Cluster.
        same_redis = app is not None and isinstance(app.backend, RedisBackend) and not settings.redis_cluster
        self._celery = app if same_redis else None

    @classmethod
    def for_app(cls, app: Celery) -> Recorder:
        """The app's recorder, created once per process, with the settings `attach()` was
        given (or the environment's)."""
        rec: Recorder | None = getattr(app, "_jobwire_recorder", None)
        if rec is None:
            settings = registry.settings_for(app)
            rec = cls(redis_client_for(app, settings), settings, app=app)
            app._jobwire_recorder = rec  # type: ignore[attr-defined]
        return rec

    def record_state(
        self,
        job_id: str,
        state: str,
        meta: Any,
        request: Any = None,
        *,
        task: str | None = None,
        celery_after_final: bool = True,
    ) -> int | None:
        """Record a custom state whose Celery meta is `meta` (what `update_state` stores).

        Celery's result key gets `meta` exactly as given, so `AsyncResult(id).info == meta`;
        the event's `progress` is `meta` with a derived `percent` (see
        `progress_from_meta`). With a Redis result backend both writes are one round trip;
        with another backend Celery writes its own first. Returns the seq, or None when
        the job is already final. The event is refused then; Celery's write still goes
        ahead by Celery's own rule (dropped only after SUCCESS) unless `celery_after_final`
        is False (`report()`: a revoked job shows no later state anywhere).
        """
        celery_meta = self.celery_meta(job_id, state, meta, request)
        if celery_meta is None:
            self._celery_write(job_id, state, meta, request)
        seq = self.record(
            job_id,
            state,
            progress=progress_from_meta(meta),
            task=task,
            celery_meta=celery_meta,
            owner=owner_of(request),
        )
        if seq is None and celery_meta is not None and celery_after_final:
            # jobwire has the job final and refused the event, and Celery's write with it;
            # Celery itself drops a write only after SUCCESS, so let it decide.
            self._celery_write(job_id, state, meta, request)
        return seq

    def _celery_write(self, job_id: str, state: str, meta: Any, request: Any) -> None:
        """Celery's own write of a custom state, exactly as plain Celery makes it."""
        if self._app is None:
            return
        backend = self._app.backend
        if isinstance(backend, JobwireBackendMixin):  # its own _store_result would come back here
            super(JobwireBackendMixin, backend)._store_result(job_id, meta, state, None, request)
        else:
            backend.store_result(job_id, meta, state, request=request)

    def record(
        self,
        job_id: str,
        state: str,
        *,
        progress: dict[str, Any] | None = None,
        result: Any = MISSING,
        error: dict[str, str] | None = None,
        retry: dict[str, Any] | None = None,
        task: str | None = None,
        only_if_new: bool = False,
        celery_meta: CeleryMeta | None = None,
        pipe: redis.client.Pipeline | None = None,
        event_id: str | None = None,
        owner: Owner | None = None,
        parent: Parent | None = None,
    ) -> int | None:
        """Record one event; return its seq, or None if Redis refused it.

        With `pipe`, the event is queued on that pipeline instead (its `execute()` returns
        the replies), so a burst of events costs one round trip; pipelined events are for
        jobs that exist already, and are not counted in a parent group.

        Refusals are deliberate: a job that is already final never changes again (so a
        late progress report cannot resurrect a revoked job), and `only_if_new` registers
        a job at publish time without clobbering one that already exists (retries).
        `owner` and `parent` are recorded only by the event that creates the job, so every
        event may carry the owner: one that recreates a lost record restores it, and none
        can take a job over. A final event of a job with a parent counts in the parent's
        aggregate (see `jobwire.record.parent_call`), under the same owner.
        """
        call = record_call(
            self.settings,
            job_id,
            state,
            progress=progress,
            result=result,
            error=error,
            retry=retry,
            task=task,
            only_if_new=only_if_new,
            celery_meta=celery_meta,
            event_id=event_id,
            owner=owner,
            parent=parent,
        )
        if pipe is not None:
            self._record(keys=call.keys(), args=call.argv(), client=pipe)
            return None
        reply = self._call(call, owner)
        if reply is None:
            return None
        count = parent_call(self.settings, reply, state, result=result, error=error, owner=owner)
        if count is not None:
            self._call(count, owner)
        return reply.seq

    def _call(self, call: RecordCall, owner: Owner | None) -> RecordReply | None:
        """Run one record-script call (retried through a failover) and index the job if
        the call created it: what every call of this writer takes, its own events and the
        counts in a parent alike."""
        reply = parse_reply(self._with_retry(call))
        if reply is not None and reply.created:
            self._index(call.job_id, call.ts, owner)
        return reply

    def create_group(
        self, group_id: str, kind: str, children: list[str], *, owner: Owner | None = None
    ) -> int | None:
        """Register a group or chord job before its children are sent: PENDING, with the
        child count its aggregate counts against and the list its children endpoint reads."""
        seq = self.record(group_id, PENDING, task=kind, only_if_new=True, owner=owner)
        if seq is None:
            return None
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.job(group_id), mapping={"total": len(children), "kind": kind})
            pipe.rpush(self.keys.children(group_id), *children)
            pipe.expire(self.keys.children(group_id), self.settings.result_expires)
            pipe.execute()
        return seq

    def _index(self, job_id: str, ts: float, owner: Owner | None) -> None:
        """Add a new job to the recent-jobs indexes (see `jobwire.record.index_commands`):
        a failure is logged, not raised, since the event itself is recorded."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                index_commands(pipe, self.settings, job_id, ts, owner)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("jobwire: could not index job %s for listings: %s", job_id, exc)

    def forget(self, job_id: str) -> None:
        """Remove every trace of a job (one that never left the publisher)."""
        tenant = self.client.hget(self.keys.job(job_id), "tenant")
        with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(
                self.keys.job(job_id),
                self.keys.history(job_id),
                self.keys.progress(job_id),
                self.keys.event_ids(job_id),
            )
            pipe.zrem(self.keys.recent, job_id)
            if tenant:
                pipe.zrem(self.keys.tenant_recent(tenant.decode()), job_id)
            pipe.execute()

    def celery_meta(self, job_id: str, state: str, result: Any, request: Any) -> CeleryMeta | None:
        """Celery's own encoding of its result write for this event, to be written in the
        same round trip (so plain Celery readers agree); None when the app's backend is
        not this Redis, and the caller must let Celery write it."""
        if self._celery is None:
            return None
        backend = self._celery.backend
        meta = backend._get_result_meta(
            result=backend.encode_result(result, state), state=state, traceback=None, request=request
        )
        meta["task_id"] = job_id
        return CeleryMeta(backend.get_key_for_task(job_id), backend.encode(meta), backend.expires)

    def _with_retry(self, call: RecordCall) -> Any:
        keys, args = call.keys(), call.argv()
        deadline = time.monotonic() + self.settings.record_retry_seconds
        for delay in backoff(0.05, 1.0):
            try:
                return self._record(keys=keys, args=args)
            except Exception as exc:  # a failover under way is retried: see `is_transient`
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not is_transient(exc):
                    raise
                delay = min(delay, remaining)  # the last try lands at the window's end, not before it
                log.warning("jobwire: Redis unavailable (%s); retrying in %.2fs", exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: backoff() never ends")


def redis_client_for(app: Celery, settings: Settings) -> redis.Redis:
    """Reuse the result backend's Redis client when it is Redis.

    Sharing it keeps jobwire's keys in the same database as Celery's result keys (a Lua
    script can only touch one database) and costs no extra connection pool. Celery's
    Sentinel backend is one too: its client asks the sentinels for the primary on every
    new connection, so the recorder follows a failover with the workers.
    """
    if settings.redis_cluster:
        return sync_client(settings.redis_target)
    backend = app.backend
    if isinstance(backend, RedisBackend):
        return backend.client  # type: ignore[no-any-return]
    return sync_client(settings.redis_target)
