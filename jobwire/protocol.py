"""The wire contract shared by the worker (`tasks/`) and the server (`server/`).

Everything that both sides must agree on lives here and nowhere else: job states, the
event format, and every Redis key and channel name. If the two sides imported their own
copies they would drift apart silently; one module makes that impossible.

Event format (one JSON object, produced once on the worker, forwarded byte-for-byte)::

    {"job_id": str, "seq": int, "state": str, "progress": object | null, "ts": float,
     "final": bool, "task"?: str, "result"?: any, "error"?: {"type", "message"},
     "retry"?: {"attempt", "countdown", "eta"}}

`seq` is assigned inside Redis (see `scripts/record.lua`), so it is gap-free and strictly
increasing per job no matter how many processes report for the same job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

# Celery's own state names, plus the ones jobwire adds meaning to.
PENDING = "PENDING"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
UNKNOWN = "UNKNOWN"

#: States after which a job never changes again; the record script refuses later events.
FINAL_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

# Job ids are usually Celery UUIDs, but other services may pick their own
# (`apply_async(task_id=...)`). Anything printable without whitespace is fine in a key.
_JOB_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


class InvalidJobId(ValueError):
    """A job id that could never have been issued (empty, too long, whitespace, binary)."""


def check_job_id(value: object) -> str:
    """Return `value` if it is a well-formed job id, else raise `InvalidJobId`."""
    if not isinstance(value, str) or not _JOB_ID.match(value):
        raise InvalidJobId(
            f"job id must be 1-200 printable ASCII characters without spaces, got {value!r:.80}"
        )
    return value


@dataclass(frozen=True)
class Keys:
    """Every Redis key and channel jobwire uses, under one prefix.

    The prefix is the same one handed to Celery as `global_keyprefix`, so a deployment's
    jobwire data and Celery results sit side by side and can be told apart from other
    apps sharing the Redis.
    """

    prefix: str = "jobwire:"

    def job(self, job_id: str) -> str:
        """Hash with the job's latest state, seq, progress, result/error and metadata."""
        return f"{self.prefix}job:{job_id}"

    def history(self, job_id: str) -> str:
        """Sorted set of the job's events scored by seq (bounded, newest kept)."""
        return f"{self.prefix}job:{job_id}:events"

    @property
    def recent(self) -> str:
        """Sorted set of job ids scored by creation time, for listings."""
        return f"{self.prefix}jobs:recent"

    def job_channel(self, job_id: str) -> str:
        """Pub/sub channel carrying one job's events."""
        return f"{self.prefix}events:{job_id}"

    @property
    def all_channel(self) -> str:
        """Pub/sub channel carrying every job's events (dashboards)."""
        return f"{self.prefix}events"

    def job_id_from_channel(self, channel: str) -> str | None:
        head = f"{self.prefix}events:"
        return channel[len(head) :] if channel.startswith(head) else None


def dumps(value: Any) -> bytes:
    """JSON-encode like every jobwire component does (compact, UTF-8, non-JSON as str)."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


def event_parts(job_id: str, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """Split an event into the bytes before and after its `seq` value.

    The record script splices the seq it allocates between the two, so the event is
    serialised exactly once, by Python, and Lua never re-encodes JSON (cjson would turn
    `[]` into `{}` and round floats).
    """
    head = b'{"job_id":' + dumps(job_id) + b',"seq":'
    tail = b"," + dumps(body)[1:] if body else b"}"
    return head, tail


def progress_meta(
    step: int | None = None,
    total: int | None = None,
    description: str | None = None,
    percent: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build the `progress` object of a custom-state event.

    `percent` is derived here, once, so every client renders the same number: step/total
    by default (step = units done). When `step` is instead the ordinal of the step now in
    progress, pass the honest `percent` of work completed, so a bar never shows 100% while
    the last step is still running.
    """
    if total is not None and (not isinstance(total, int) or total <= 0):
        raise ValueError(f"total must be a positive int, got {total!r}")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if step is not None and total is not None and step > total:
        raise ValueError(f"step {step} is past total {total}")
    meta: dict[str, Any] = dict(extra)
    if step is not None:
        meta["step"] = step
    if total is not None:
        meta["total"] = total
    if percent is not None:
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"percent must be a number from 0 to 100, got {percent!r}")
        meta["percent"] = round(float(percent), 2)
    elif step is not None and total is not None:
        meta["percent"] = round(100.0 * step / total, 2)
    if description is not None:
        meta["description"] = description
    return meta
