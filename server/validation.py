"""Checks on what clients send, shared by the HTTP and websocket endpoints.

Each raises `JobwireError` whose message names the field, the value and what was
expected; the transport turns it into a 4xx JSON error or a websocket error message.
"""

from __future__ import annotations

from typing import Any

from jobwire.protocol import JobwireError, check_job_id

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


def seq(value: Any, *, field: str) -> int:
    """A non-negative integer seq (also accepted as a decimal string, as headers send it)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JobwireError("invalid_request", f"{field} must be a non-negative integer, got {value!r:.40}")
    return value


def since_map(value: Any) -> dict[str, int]:
    """`{"<job id>": <seq>}`: the last seq the client has seen per job."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobwireError("invalid_request", f"since must be an object of job id to seq, got {value!r:.60}")
    return {job_id(k): seq(v, field=f"since[{k!r}]") for k, v in value.items()}
