"""celery-progress's answers, from jobwire's events: pure rules, no I/O.

Front-ends built on celery-progress (`CeleryProgressBar`, `CeleryWebSocketProgressBar`)
poll, or listen on a websocket, for one JSON object per task and read nothing else::

    {"state", "complete", "success", "progress": {"pending", "current", "total",
     "percent", "description"}, "result"?}

This module answers that from a jobwire event (or a job's snapshot), exactly as
celery-progress's `Progress.get_info` answers from Celery's result backend, so such a
page needs nothing changed but its URL. Where the two differ on purpose:

- A custom state (anything but Celery's own states) is progress: `complete: false` with
  the state's `{current, total, percent, description}`. celery-progress answers only its
  own `PROGRESS` so and ends any other state as "Unknown state X"; jobwire's jobs report
  their steps in states of their own (`VALIDATING`, `PROCESSING`, ...), and so do groups
  (`RUNNING` with `{done, total}`).
- Counts come in either convention (`step`/`total`, as Celery's docs write them, or
  celery-progress's `current`/`total`), and `percent` is the event's own when it has one:
  a task that knows better than `current/total` (a step still running) said so.
- An unknown id is answered as celery-progress answers one (Celery calls every id it has
  not heard of `PENDING`), and so is another tenant's job: jobwire never tells the two
  apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jobwire.protocol import FAILURE, PENDING, RETRY, REVOKED, STARTED, SUCCESS

#: The state celery-progress's own `ProgressRecorder` reports in (a custom state here too).
PROGRESS = "PROGRESS"
#: The state celery-progress's `task_postrun` handler stores for a task that raised
#: `Ignore`, with the task's return value as a string: complete, neither success nor failure.
IGNORED = "IGNORED"

#: What `next_retry_seconds` says when a retry named no countdown (celery-progress's word).
UNKNOWN_COUNTDOWN = "Unknown"
#: celery-progress cuts a retry's reason to this many characters, then adds "...".
RETRY_MESSAGE_CHARS = 50


def answer(
    state: str,
    *,
    progress: Any = None,
    result: Any = None,
    error: Mapping[str, Any] | None = None,
    retry: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """celery-progress's answer for a task in `state`, with the event's fields.

    Keys in celery-progress's order; `result` only where it has one (a task still on its
    way has none).
    """
    if state == SUCCESS:
        return _done(state, True, result)
    if state == FAILURE:
        return _done(state, False, _message(error))  # str(exception): its message alone
    if state == RETRY:
        return _done(state, False, _retry(error, retry))
    if state == REVOKED:
        return _done(state, False, f"Task {_message(error) or 'revoked'}")
    if state == IGNORED:
        value = progress.get("value", progress) if isinstance(progress, Mapping) else progress
        return _done(state, None, "" if value is None else str(value))
    if state in (PENDING, STARTED):
        return {"state": state, "complete": False, "success": None, "progress": unknown_progress(state)}
    return {"state": state, "complete": False, "success": None, "progress": custom_progress(progress)}


def from_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """The answer for a jobwire event (see `jobwire.protocol`): what the websocket
    variant sends for each event, and the polling answer for the job's latest."""
    return answer(
        str(event.get("state") or PENDING),
        progress=event.get("progress"),
        result=event.get("result"),
        error=_mapping(event.get("error")),
        retry=_mapping(event.get("retry")),
    )


def from_snapshot(snapshot: Mapping[str, Any] | None) -> dict[str, Any]:
    """The answer for a job's snapshot (`JobStore.snapshot`); None, an unknown id (or
    another tenant's job), is `PENDING`, as celery-progress answers any id Celery has not
    heard of. A snapshot carries no retry countdown: `next_retry_seconds` is "Unknown"."""
    if snapshot is None:
        return unknown()
    return answer(
        str(snapshot.get("status") or PENDING),
        progress=snapshot.get("progress"),
        result=snapshot.get("result"),
        error=_mapping(snapshot.get("error")),
    )


def unknown() -> dict[str, Any]:
    """The answer for an id that names no job the caller may see."""
    return answer(PENDING)


def unknown_progress(state: str) -> dict[str, Any]:
    """celery-progress's progress for a task not yet reporting (PENDING, STARTED)."""
    return {"pending": state == PENDING, "current": 0, "total": 100, "percent": 0}


def completed_progress() -> dict[str, Any]:
    """celery-progress's progress for any task that is done, however it ended."""
    return {"pending": False, "current": 100, "total": 100, "percent": 100}


def custom_progress(progress: Any) -> dict[str, Any]:
    """A custom state's progress as celery-progress's `ProgressRecorder` writes it:
    `{pending, current, total, percent, description}`, plus whatever else the task
    reported (a page's own `onProgress` may read it).

    `current` is `current`, else `step`, else a group's `done`. Without a `total`,
    celery-progress's recorder counts against 0 (percent 0); with a `percent` alone, the
    count is out of 100, as celery-progress's own placeholders are; with nothing, it is
    0 of 100 (its JS then says "Task started...").
    """
    meta: dict[str, Any]
    if isinstance(progress, Mapping):
        meta = dict(progress)
    else:
        meta = {} if progress is None else {"value": progress}
    current = _first_count(meta, "current", "step", "done")
    total = _count(meta.get("total"))
    percent = _number(meta.get("percent"))
    if percent is None:
        percent = round(100.0 * current / total, 2) if current is not None and total else 0
    if current is None and total is None:
        current, total = percent, 100
    elif current is None:
        current = 0
    elif total is None:
        total = 0
    description = meta.get("description")
    return {
        **meta,
        "pending": False,
        "current": current,
        "total": total,
        "percent": percent,
        "description": description if isinstance(description, str) else "",
    }


# -- internals -----------------------------------------------------------------------------


def _done(state: str, success: bool | None, result: Any) -> dict[str, Any]:
    return {
        "state": state,
        "complete": True,
        "success": success,
        "progress": completed_progress(),
        "result": result,
    }


def _retry(error: Mapping[str, Any] | None, retry: Mapping[str, Any] | None) -> dict[str, Any]:
    """`{next_retry_seconds, message}`: the countdown the task retried with, in whole
    seconds ("Unknown" without one), and the reason cut as celery-progress cuts it."""
    countdown = _number((retry or {}).get("countdown"))
    seconds: int | str = round(countdown) if countdown is not None else UNKNOWN_COUNTDOWN
    return {"next_retry_seconds": seconds, "message": f"{_message(error)[:RETRY_MESSAGE_CHARS]}..."}


def _message(error: Mapping[str, Any] | None) -> str:
    message = (error or {}).get("message")
    return "" if message is None else str(message)


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _number(value: Any) -> float | int | None:
    """A finite number (never a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _count(value: Any) -> float | int | None:
    number = _number(value)
    return number if number is not None and number >= 0 else None


def _first_count(meta: Mapping[str, Any], *names: str) -> float | int | None:
    for name in names:
        count = _count(meta.get(name))
        if count is not None:
            return count
    return None
