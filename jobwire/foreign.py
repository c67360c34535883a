"""Celery result backends of apps that never imported jobwire: what to follow, and how
Celery's stored meta reads as a jobwire event (see `jobwire.server.bridge`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from jobwire.protocol import error_from_celery, progress_from_meta

_META = "celery-task-meta-"


@dataclass(frozen=True)
class ForeignBackend:
    """A Celery Redis result backend to follow: `redis://host:port/db#prefix=…&tenant=…`.

    `prefix` is the app's `global_keyprefix` (default none); `tenant`, when given, owns
    every job seen there (with JWT auth, jobs without one are for admins only).
    """

    url: str
    prefix: str = ""
    tenant: str = ""

    @classmethod
    def parse(cls, spec: str) -> ForeignBackend:
        parts = urlsplit(spec.strip())
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"is not a redis:// URL: {spec!r}")
        options = {k: v[-1] for k, v in parse_qs(parts.fragment).items()}
        unknown = set(options) - {"prefix", "tenant"}
        if unknown:
            raise ValueError(f"has unknown options {sorted(unknown)} in {spec!r}; use #prefix=…&tenant=…")
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
        return cls(url, options.get("prefix", ""), options.get("tenant", ""))

    @property
    def pattern(self) -> str:
        return f"{self.prefix}{_META}*"

    def key(self, job_id: str) -> str:
        return f"{self.prefix}{_META}{job_id}"

    def job_id(self, channel: str) -> str | None:
        head = self.prefix + _META
        return channel[len(head) :] if channel.startswith(head) else None


def event_from_meta(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A Celery result meta as (state, event fields), the way native jobs report them."""
    state = str(meta.get("status") or "PENDING")
    result = meta.get("result")
    fields: dict[str, Any] = {}
    if meta.get("name"):
        fields["task"] = str(meta["name"])
    if state == "SUCCESS":
        fields["result"] = result
    elif state in ("FAILURE", "RETRY", "REVOKED"):
        fields["error"] = error_from_celery(result)
    elif state not in ("PENDING", "STARTED", "RECEIVED"):
        fields["progress"] = progress_from_meta(result)
    return state, fields


def digest(channel: bytes | str, payload: bytes) -> str:
    raw = channel.encode() if isinstance(channel, str) else channel
    return hashlib.sha1(raw + b"\0" + payload).hexdigest()
