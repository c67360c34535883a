"""Storing large results from tasks (see `jobwire.storage`): explicitly, or automatically
when a result's serialized size passes `JOBWIRE_RESULT_OFFLOAD_BYTES`."""

from __future__ import annotations

from typing import Any

from celery import Celery

from jobwire.protocol import dumps
from jobwire.storage import ResultStore, is_reference, reference, store_for
from jobwire.tasks import registry


def result_store(app: Celery) -> ResultStore:
    """The app's object store, built once per process."""
    store: ResultStore | None = getattr(app, "_jobwire_store", None)
    if store is None:
        store = store_for(registry.settings_for(app))
        app._jobwire_store = store  # type: ignore[attr-defined]
    return store


def store(app: Celery, job_id: str, data: bytes | str, *, content_type: str, filename: str) -> dict[str, Any]:
    """Store `data` for `job_id`; return the reference to return from the task."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return reference(result_store(app), job_id, raw, content_type=content_type, filename=filename)


def offload(app: Celery, job_id: str, result: Any) -> Any:
    """`result`, or a reference to it stored as JSON when it is too big for Redis."""
    if is_reference(result):
        return result
    threshold = registry.settings_for(app).result_offload_bytes
    encoded = dumps(result)
    if len(encoded) <= threshold:
        return result
    return reference(
        result_store(app), job_id, encoded, content_type="application/json", filename="result.json"
    )
