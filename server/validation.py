"""Checks on what clients send, shared by the HTTP and websocket endpoints.

Each raises `ValidationError` whose message names the field, the value and what was
expected; the transport turns it into a 4xx JSON error or a websocket error message.
"""

from __future__ import annotations

from typing import Any

from jobwire.protocol import InvalidJobId, check_job_id


class ValidationError(ValueError):
    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


def job_id(value: Any) -> str:
    try:
        return check_job_id(value)
    except InvalidJobId as exc:
        raise ValidationError(str(exc), "invalid_job_id") from None


def job_ids(value: Any, *, limit: int, field: str = "job_ids") -> list[str]:
    """A non-empty list of distinct, well-formed job ids (order kept, duplicates dropped)."""
    if not isinstance(value, list):
        raise ValidationError(f"{field} must be a list of job ids, got {type(value).__name__}")
    if len(value) > limit:
        raise ValidationError(f"{field} holds {len(value)} ids; at most {limit} per request", "too_many_ids")
    return list(dict.fromkeys(job_id(v) for v in value))


def seq(value: Any, *, field: str) -> int:
    """A non-negative integer seq (also accepted as a decimal string, as headers send it)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{field} must be a non-negative integer, got {value!r:.40}")
    return value


def since_map(value: Any) -> dict[str, int]:
    """`{"<job id>": <seq>}`: the last seq the client has seen per job."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(f"since must be an object of job id to seq, got {value!r:.60}")
    return {job_id(k): seq(v, field=f"since[{k!r}]") for k, v in value.items()}
