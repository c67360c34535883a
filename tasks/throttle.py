"""Task rate limits shared by every worker on every machine: `self.throttle("stripe_api")`.

A limit is a named token bucket in Redis (see `jobwire.ratelimit`): `define_limit()` sets
its rate and burst there, so every worker reads the same settings and a change applies to
all of them at once. `throttle()` takes a token, from the shared bucket or one per tenant
(or any key), so one tenant's flood cannot starve another.

With no token free, the task is not retried blindly: the script *reserves* the next free
token and says when it will exist, and the task is re-published to run exactly then, with
a little jitter, holding no worker process while it waits, and not counting against
`max_retries`. When it runs again it already holds its token. Meanwhile the job shows a
`RATE_LIMITED` event whose progress says why and until when, on every transport.
"""

from __future__ import annotations

import random
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from jobwire.protocol import JobwireError
from jobwire.ratelimit import Buckets
from jobwire.rates import parse_rate
from jobwire.tasks.recorder import SUBJECT_HEADER, TENANT_HEADER, Recorder

#: Message headers of a re-scheduled job: it waited on this limit / holds its token already.
THROTTLED_HEADER = "jobwire_throttled"
RESERVED_HEADER = "jobwire_reserved"
WAITING_STATE = "RATE_LIMITED"
MAX_RESERVATION = 3600.0  # seconds: past that, a job asks again later instead of queueing


def define_limit(app: Celery, name: str, rate: str, *, burst: int | None = None) -> dict[str, Any]:
    """Set limit `name` to `rate` (`"100/m"`) with bursts of `burst` (default: one
    second's worth, at least 1), for every worker at once."""
    parsed = parse_rate(rate)
    capacity = burst if burst is not None else max(1, round(parsed.per_second))
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise JobwireError("invalid_request", f"burst must be a whole number >= 1, got {burst!r}")
    recorder = Recorder.for_app(app)
    keys = recorder.keys
    spec = {"rate": repr(parsed.per_second), "capacity": capacity, "spec": str(parsed)}
    with recorder.client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.limit(name), mapping=spec)
        pipe.sadd(keys.limits, name)
        pipe.execute()
    return {"name": name, "rate": str(parsed), "burst": capacity}


def limits(app: Celery) -> list[dict[str, Any]]:
    """Every defined limit, with how many jobs wait on each right now."""
    recorder = Recorder.for_app(app)
    keys = recorder.keys
    out = []
    for raw in sorted(recorder.client.smembers(keys.limits)):
        name = raw.decode()
        conf = recorder.client.hgetall(keys.limit(name))
        waiting = recorder.client.zcount(keys.limit_waiting(name), time.time(), "+inf")
        out.append(
            {
                "name": name,
                "rate": conf.get(b"spec", b"").decode(),
                "burst": int(conf.get(b"capacity", 0)),
                "waiting": waiting,
            }
        )
    return out


def throttle(task: Task, name: str, *, per: str | None = None, rate: str = "1/s") -> None:
    """Take a token of limit `name` for this job, or re-schedule it for when one exists.

    `per="tenant"` gives each tenant (the job's owner) its own bucket; any other string is
    a bucket key of your own (a user id, an account). `rate` is used until the limit is
    defined in Redis (`define_limit`). Returns when the job may go ahead; otherwise raises
    `Ignore` after re-publishing it (the caller's code simply does not continue).
    """
    request = task.request
    if request.id is None:  # called as a plain function: nothing to limit
        return
    if _reserved(request) == name:
        return  # this run was scheduled for a token reserved earlier
    bucket = _bucket(request, per)
    parsed = parse_rate(rate)
    recorder = Recorder.for_app(task.app)
    buckets = Buckets(recorder.client, recorder.keys)
    taken = buckets.take(
        name,
        bucket,
        rate=parsed.per_second,
        capacity=max(1, round(parsed.per_second)),
        max_wait=MAX_RESERVATION,
    )
    if taken.allowed and taken.retry_after == 0:
        return
    # Reserved: run again when the token exists (reservations are already spread out, so
    # a few ms of jitter will do; it only ever delays, so a token is never used early).
    # Not even reserved (past an hour): ask again then, spread more.
    spread = 0.02 if taken.allowed else min(5.0, taken.retry_after * 0.1)
    wait = taken.retry_after + random.uniform(0, spread)
    retry_at = time.time() + wait
    meta = {
        "reason": "rate_limited",
        "limit": name,
        "bucket": bucket or None,
        "retry_at": round(retry_at, 3),
        "retry_in": round(wait, 3),
        "description": f"waiting for quota ({name})",
    }
    recorder.record_state(request.id, WAITING_STATE, meta, request, task=task.name)
    waiting = recorder.keys.limit_waiting(name)
    with recorder.client.pipeline(transaction=False) as pipe:  # who waits, for the panel
        pipe.zremrangebyscore(waiting, "-inf", time.time())
        pipe.zadd(waiting, {request.id: retry_at})
        pipe.expire(waiting, int(wait) + 60)
        pipe.execute()
    headers = {
        TENANT_HEADER: getattr(request, TENANT_HEADER, None),
        SUBJECT_HEADER: getattr(request, SUBJECT_HEADER, None),
    }
    headers = {k: v for k, v in headers.items() if v}
    headers[THROTTLED_HEADER] = name
    if taken.allowed:
        headers[RESERVED_HEADER] = name
    task.signature_from_request(
        request, countdown=wait, retries=request.retries, headers=headers
    ).apply_async()
    raise Ignore()


def _reserved(request: Any) -> str | None:
    value = getattr(request, RESERVED_HEADER, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(RESERVED_HEADER)
    return value if isinstance(value, str) else None


def _bucket(request: Any, per: str | None) -> str:
    if per is None:
        return ""
    if per == "tenant":
        tenant = getattr(request, TENANT_HEADER, None)
        return f"tenant:{tenant}" if tenant else "tenant:"
    return f"key:{per}"
