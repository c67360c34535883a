"""Checks on what clients send, shared by the HTTP and websocket endpoints.

Each raises `JobwireError` whose message names the field, the value and what was
expected; the transport turns it into a 4xx JSON error or a websocket error message.
"""

from __future__ import annotations

import math
import re
from typing import Any

from jobwire.protocol import JobwireError, check_job_id, parse_seq

job_id = check_job_id


def job_ids(value: Any, *, limit: int, field: str = "job_ids") -> list[str]:
    """A non-empty list of distinct, well-formed job ids (order kept, duplicates dropped)."""
    if not isinstance(value, list):
        raise JobwireError(
            "invalid_request", f"{field} must be a list of job ids, got {type(value).__name__}"
        )
    if len(value) > limit:
        raise JobwireError("too_many_ids", f"{field} holds {len(value)} ids; at most {limit} per request")
    return list(dict.fromkeys(job_id(v) for v in value))


seq = parse_seq


def since_map(value: Any) -> dict[str, int]:
    """`{"<job id>": <seq>}`: the last seq the client has seen per job."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobwireError("invalid_request", f"since must be an object of job id to seq, got {value!r:.60}")
    return {job_id(k): seq(v, field=f"since[{k!r}]") for k, v in value.items()}


_INT = re.compile(r"^[0-9]{1,9}$")


def bounded_int(value: str, *, field: str, low: int, high: int) -> int:
    """A decimal query parameter from `low` to `high`."""
    if not _INT.match(value) or not low <= int(value) <= high:
        raise JobwireError(
            "invalid_request", f"{field} must be an integer from {low} to {high}, got {value!r:.40}"
        )
    return int(value)


def timestamp(value: str, *, field: str) -> float:
    """A finite, non-negative number (Unix seconds): `float()` alone takes 'NaN' and 'inf'."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or len(value) > 40:
        raise JobwireError("invalid_request", f"{field} must be a number of seconds, got {value!r:.40}")
    return number


_EPOCH = re.compile(r"^[0-9a-f]{1,32}$")


def epoch(value: Any, *, field: str = "epoch") -> str:
    """An epoch as the server hands them out (short lowercase hex)."""
    if not isinstance(value, str) or not _EPOCH.match(value):
        raise JobwireError(
            "invalid_request", f"{field} must be an epoch as events carry it, got {value!r:.40}"
        )
    return value


def epoch_map(value: Any) -> dict[str, str]:
    """`{"<job id>": "<epoch>"}`: the epoch each `since` counts in."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobwireError(
            "invalid_request", f"epochs must be an object of job id to epoch, got {value!r:.60}"
        )
    return {job_id(k): epoch(v, field=f"epochs[{k!r}]") for k, v in value.items()}


def event_id(value: str) -> tuple[int, str | None]:
    """An SSE `Last-Event-ID`: `<epoch>:<seq>` as the single-job stream sends them, or a
    plain seq."""
    head, sep, tail = value.rpartition(":")
    if sep:
        return seq(tail, field="Last-Event-ID"), epoch(head, field="Last-Event-ID epoch")
    return seq(value, field="Last-Event-ID"), None
