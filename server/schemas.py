"""Request bodies, as pydantic models: validated in one place, and described by the same
models in the OpenAPI document.

`parse()` turns pydantic's errors into jobwire's: one `JobwireError` (invalid_request)
whose message names the field and what was expected.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobwire.protocol import MAX_GROUP_CHILDREN, MAX_JSON_DEPTH, JobwireError

Model = TypeVar("Model", bound=BaseModel)


class TaskCall(BaseModel):
    """One allow-listed task with its arguments."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task: str = Field(min_length=1, description="an allow-listed task name (GET /api/v1/tasks)")
    args: list[Any] = Field(default_factory=list, description="positional arguments")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")


class SubmitRequest(BaseModel):
    """`POST /api/v1/jobs`: one task, or a group of tasks (a chord, with a callback). A
    group is one job whose progress is its children's: done, failed, total."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task: str | None = Field(
        default=None, min_length=1, description="an allow-listed task name (GET /api/v1/tasks)"
    )
    args: list[Any] = Field(default_factory=list, description="positional arguments")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")
    group: list[TaskCall] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_GROUP_CHILDREN,
        description=f"tasks run in parallel as one job (at most {MAX_GROUP_CHILDREN})",
    )
    callback: TaskCall | None = Field(
        default=None, description="with group: a chord's callback, given the children's results"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> SubmitRequest:
        if (self.task is None) == (self.group is None):
            raise ValueError('send either "task" (one job) or "group" (a group or chord), not both')
        if self.callback is not None and self.group is None:
            raise ValueError('"callback" needs a "group" (it makes a chord)')
        if self.group is not None and (self.args or self.kwargs):
            raise ValueError('with "group", give each task its own "args" and "kwargs"')
        return self

    def calls(self) -> list[TaskCall]:
        """Every task this submit sends (for the allow-list check)."""
        if self.group is None:
            return [TaskCall(task=self.task or "", args=self.args, kwargs=self.kwargs)]
        return [*self.group, *([self.callback] if self.callback else [])]


class BatchStatusRequest(BaseModel):
    """`POST /api/v1/jobs/batch-status` (a bare JSON array of ids is accepted too)."""

    job_ids: list[str] = Field(description="job ids; at most JOBWIRE_BATCH_MAX_IDS")


class LimitRequest(BaseModel):
    """`PUT /api/v1/admin/rate-limits/{name}`: a rate like "100/m", and an optional burst."""

    model_config = ConfigDict(extra="forbid")

    rate: str = Field(
        description='a count per s, m or h, e.g. "100/m" (zero is refused: Celery reads it as no limit)'
    )
    burst: int | None = Field(default=None, ge=1, description="tokens a burst may take at once")


class CeleryLimitRequest(BaseModel):
    """`PUT /api/v1/admin/rate-limits/celery/{task}`: Celery's own per-node limit."""

    model_config = ConfigDict(extra="forbid")

    rate: str = Field(description='e.g. "10/m" (zero is refused: Celery reads it as no limit)')
    workers: list[str] | None = Field(
        default=None, description="worker hostnames; default: all (and remembered)"
    )


class ScaleRequest(BaseModel):
    """`POST /api/v1/admin/rate-limits/celery`: scale every declared limit, or restore them."""

    model_config = ConfigDict(extra="forbid")

    factor: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    restore: bool = False


#: What each field is, said to a client that sent something else.
_EXPECTED = {
    "task": "a task name (string)",
    "args": "a list",
    "kwargs": "an object",
    "rate": 'a rate like "100/m"',
    "burst": "a whole number >= 1",
    "factor": "a number > 0",
}


def parse(model: type[Model], body: Any) -> Model:
    """`body` (decoded JSON) as `model`, or `JobwireError` saying what is wrong with it."""
    if not isinstance(body, dict):
        fields = ", ".join(f"{n}{'' if f.is_required() else '?'}" for n, f in model.model_fields.items())
        raise JobwireError("invalid_request", f"body must be an object: {{{fields}}}")
    deep = _deeper_than(body, MAX_JSON_DEPTH)
    if deep:
        raise JobwireError("invalid_request", f"{deep} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        if unknown:
            raise JobwireError("invalid_request", f"unknown fields: {', '.join(unknown)}") from None
        if errors[0]["type"] == "value_error" and not errors[0]["loc"]:
            raise JobwireError("invalid_request", str(errors[0]["ctx"]["error"])) from None
        if len(errors[0]["loc"]) > 1:  # inside a group: name the item, e.g. group[3].task
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in errors[0]["loc"][1:])
            raise JobwireError(
                "invalid_request", f"{errors[0]['loc'][0]}{path}: {errors[0]['msg']}"
            ) from None
        field = str(errors[0]["loc"][0]) if errors[0]["loc"] else "body"
        if field in body and field in _EXPECTED and errors[0]["type"].endswith("_type"):
            got = type(body[field]).__name__
            raise JobwireError("invalid_request", f"{field} must be {_EXPECTED[field]}, got {got}") from None
        expected = _EXPECTED.get(field)
        message = f"{field} must be {expected}" if expected else f"{field}: {errors[0]['msg']}"
        raise JobwireError("invalid_request", message) from None


def _deeper_than(body: dict[str, Any], limit: int) -> str | None:
    """The top-level field whose value nests deeper than `limit`, if any (iteratively:
    the point is to refuse what would blow a recursive encoder's stack)."""
    for field, value in body.items():
        stack = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > limit:
                return str(field)
            if isinstance(node, dict):
                stack.extend((v, depth + 1) for v in node.values())
            elif isinstance(node, list):
                stack.extend((v, depth + 1) for v in node)
    return None
