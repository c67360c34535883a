"""Large results in object storage (see `jobwire.storage`), kept invisible to Celery's API.

Two ways in:

- Explicitly: `ProgressTask.store_result(data, ...)` stores a file (a PDF, an export) and
  the task returns its reference. The reference *is* the task's result: `AsyncResult.get()`
  returns it, and the dashboard offers the download.
- Automatically: a result whose encoding, as Celery stores it (the app's
  `result_serializer` and compression), is longer than `JOBWIRE_RESULT_OFFLOAD_BYTES` goes
  to the store and Celery's key holds a reference marked with that serializer. Reading it
  through Celery (`get()`, `.result`, `.info`, a group's or chord's join) brings the value
  back (`load`), so attaching jobwire never changes what Celery returns; the SUCCESS event
  and the dashboard carry the reference and the download link.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, states
from celery.backends.base import KeyValueStoreBackend

from jobwire.storage import ResultStore, is_reference, reference, store_for
from jobwire.tasks import registry

#: The field that marks an automatic offload, and names the serializer Celery reads it with.
SERIALIZER = "serializer"


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


def is_offloaded(value: Any) -> bool:
    """A reference made by `offload` (read back through Celery), not one a task returned."""
    return is_reference(value) and isinstance(value.get(SERIALIZER), str)


def offload(backend: Any, job_id: str, result: Any) -> Any:
    """What Celery should store for `result`: itself, or a reference to its encoding in the
    object store when that is longer than the threshold. Raises `StorageError` when it
    must be stored and cannot be (the job fails: a reference never points at nothing)."""
    if is_reference(result):
        return result  # stored by the task itself
    threshold = registry.settings_for(backend.app).result_offload_bytes
    try:
        payload = backend.encode(backend.encode_result(result, states.SUCCESS))
    except Exception:  # noqa: BLE001 - Celery's own write raises its own error for it
        return result
    if len(payload) <= threshold:
        return result
    plain_json = backend.serializer == "json" and not getattr(backend, "compression", None)
    ref = reference(
        result_store(backend.app),
        job_id,
        payload if isinstance(payload, bytes) else payload.encode(),
        content_type="application/json" if plain_json else "application/octet-stream",
        filename="result.json" if plain_json else "result.bin",
    )
    ref[SERIALIZER] = backend.serializer
    return ref


def load(backend: Any, ref: dict[str, Any]) -> Any:
    """The value an automatic offload stands for, decoded as Celery would have."""
    return backend.decode(result_store(backend.app).get(ref["key"]))


def result_exists_in(app: Celery) -> Callable[[str], bool]:
    """Whether Celery still holds a job's result (the cleanup keeps its objects while so)."""
    backend = app.backend
    if isinstance(backend, KeyValueStoreBackend):
        return lambda job_id: backend.get(backend.get_key_for_task(job_id)) is not None
    return lambda job_id: backend.get_task_meta(job_id).get("status") != states.PENDING
