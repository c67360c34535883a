"""Large results live in object storage; Redis and every event carry only a reference.

A reference is a small dict, what `AsyncResult(id).result` and the SUCCESS event hold::

    {"type": "stored_result", "storage": "file" | "s3", "key": "...", "size_bytes": int,
     "content_type": str, "filename": str, "sha256": hex, "generated_at": unix seconds}

Two stores share one interface: the local filesystem (what `make run` uses; server and
worker must share the directory) and S3 through boto3 (any S3-compatible service, by
endpoint URL). An object is written completely before its reference exists anywhere, so a
storage failure fails the job instead of leaving a reference to nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobwire.protocol import id_from_key, key_id
from jobwire.settings import S3_MISSING, Settings

REF_TYPE = "stored_result"


class StorageError(RuntimeError):
    """The object store refused or failed a write, read or delete."""


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == REF_TYPE and isinstance(value.get("key"), str)


#: The longest folder name an object key holds: a long id's key form is split over several.
_SEGMENT = 200


def object_key(job_id: str, filename: str) -> str:
    """`<job id>/<filename>`: one folder per job, so a job's objects go with it. The id is
    in its `key_id` form (any id Celery takes is a safe path), split into folders of at
    most 200 characters, which every filesystem and S3 take."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in filename)[:120] or "result"
    folder = key_id(job_id)
    folder = "/".join(folder[i : i + _SEGMENT] for i in range(0, len(folder), _SEGMENT))
    return f"{folder}/{safe}"


def job_of(key: str) -> str | None:
    """The job id an object key belongs to (see `object_key`); None for a foreign object."""
    folder = key.rpartition("/")[0]
    return id_from_key(folder.replace("/", "")) if folder else None


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    modified: float


class ResultStore(Protocol):
    name: str

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """The object's bytes; `StorageError` when it is gone or cannot be read."""

    def path(self, key: str) -> Path | None:
        """A local file to stream, for stores that have one."""

    def url(self, key: str, *, filename: str, content_type: str, expires: int) -> str | None:
        """A short-lived URL to redirect to, for stores that have one."""

    def delete(self, key: str) -> None: ...

    def list(self) -> Iterator[Stored]: ...


def reference(
    store: ResultStore, job_id: str, data: bytes, *, content_type: str, filename: str
) -> dict[str, Any]:
    """Store `data` for `job_id` and return its reference (only once it is stored)."""
    key = object_key(job_id, filename)
    store.put(key, data, content_type)
    return {
        "type": REF_TYPE,
        "storage": store.name,
        "key": key,
        "size_bytes": len(data),
        "content_type": content_type,
        "filename": filename,
        "sha256": hashlib.sha256(data).hexdigest(),
        "generated_at": round(time.time(), 3),
    }


class FilesystemStore:
    """Objects as files under one directory (written to a temporary file, then renamed,
    so a reader never sees half an object)."""

    name = "file"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _file(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StorageError(f"object key {key!r} leaves the store")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._file(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        except OSError as exc:
            raise StorageError(f"could not write {key!r} under {self.root}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._file(key).read_bytes()
        except OSError as exc:
            raise StorageError(f"could not read {key!r} under {self.root}: {exc}") from exc

    def path(self, key: str) -> Path | None:
        path = self._file(key)
        return path if path.is_file() else None

    def url(self, key: str, *, filename: str, content_type: str, expires: int) -> str | None:
        return None

    def delete(self, key: str) -> None:
        try:
            self._file(key).unlink()
        except FileNotFoundError:
            pass  # another cleanup got there first
        folder = self._file(key).parent
        while folder != self.root:  # the job's folders, once empty
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent

    def list(self) -> Iterator[Stored]:
        # os.walk, not glob: a job's folder removed meanwhile by another cleanup must be
        # skipped (walk ignores it), and glob raises when a folder it listed is gone.
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = os.path.join(folder, name)
                with suppress(OSError):
                    stat = os.stat(path)
                    key = os.path.relpath(path, self.root).replace(os.sep, "/")
                    if "/" in key:  # objects live in a job's folder; anything else is not ours
                        yield Stored(key, stat.st_size, stat.st_mtime)


class S3Store:
    """Objects in an S3 bucket (boto3), under a prefix; downloads by presigned URL."""

    name = "s3"

    def __init__(self, settings: Settings) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StorageError(S3_MISSING) from None

        self.bucket, self.prefix = settings.s3_bucket, settings.s3_prefix
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region or None,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            config=Config(signature_version="s3v4", retries={"max_attempts": 3}),
        )

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not store {key!r} in s3://{self.bucket}/{self.prefix}: {exc}") from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
            return bytes(body.read())
        except (BotoCoreError, ClientError) as exc:
            where = f"s3://{self.bucket}/{self.prefix}"
            raise StorageError(f"could not read {key!r} from {where}: {exc}") from exc

    def path(self, key: str) -> Path | None:
        return None

    def url(self, key: str, *, filename: str, content_type: str, expires: int) -> str | None:
        return str(
            self.client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self.prefix + key,
                    "ResponseContentType": content_type,
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                },
                ExpiresIn=expires,
            )
        )

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)  # idempotent in S3

    def list(self) -> Iterator[Stored]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield Stored(obj["Key"][len(self.prefix) :], obj["Size"], obj["LastModified"].timestamp())


def store_for(settings: Settings) -> ResultStore:
    """The configured store (`JOBWIRE_RESULT_STORE`: file or s3)."""
    if settings.result_store == "s3":
        return S3Store(settings)
    return FilesystemStore(settings.result_dir)


def cleanup(
    store: ResultStore,
    job_exists: Callable[[str], bool],
    *,
    max_age: float,
    result_exists: Callable[[str], bool] = lambda _job_id: False,
) -> int:
    """Delete the objects nothing refers to any more; return how many.

    An object lives as long as Celery's result for its job does (`result_exists`: Celery's
    `result_expires`, "never" included), since `AsyncResult.get()` reads it back from
    there. Without one, it lives while jobwire's record of the job exists and it is at
    most `max_age` seconds old. Safe to run in several processes at once: a delete of an
    object that another cleanup already deleted is a no-op.
    """
    now, deleted = time.time(), 0
    for obj in list(store.list()):
        job_id = job_of(obj.key)
        if job_id is not None and result_exists(job_id):
            continue
        if job_id is None or now - obj.modified > max_age or not job_exists(job_id):
            store.delete(obj.key)
            deleted += 1
    return deleted
