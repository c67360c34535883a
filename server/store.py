"""Reads of job state for the server (writes belong to `tasks.recorder`).

No endpoint spells out a Redis command: they all come here, each read in one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from jobwire.server.events import Delivery
from redis.asyncio import Redis

from jobwire import scripts
from jobwire.protocol import UNKNOWN, Keys


class JobStore:
    """Async reads of jobwire's Redis keys."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._batch = redis.register_script(scripts.BATCH_STATUS)

    async def snapshot(self, job_id: str) -> dict[str, Any] | None:
        """The job's current state for polling clients, or None if it was never seen."""
        fields = await self.redis.hgetall(self.keys.job(job_id))
        return _snapshot(job_id, fields) if fields else None

    async def events_since(self, job_id: str, since: int) -> tuple[bool, list[Delivery]]:
        """Whether the job exists, and its retained events with seq > `since`, in order."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.job(job_id))
            pipe.zrangebyscore(self.keys.history(job_id), f"({since}", "+inf")
            exists, raws = await pipe.execute()
        return bool(exists), [Delivery.parse(raw) for raw in raws]

    async def batch_status(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Status of many jobs in one Redis command (a Lua script), whatever the count."""
        if not job_ids:
            return {}
        flat = await self._batch(keys=[self.keys.job(j) for j in job_ids])
        out: dict[str, dict[str, Any]] = {}
        for i, job_id in enumerate(job_ids):
            state, seq, final = flat[3 * i : 3 * i + 3]
            if state is None:
                out[job_id] = {"status": UNKNOWN, "ready": False, "seq": 0}
            else:
                out[job_id] = {"status": state.decode(), "ready": final == b"1", "seq": int(seq)}
        return out

    async def recent(self, *, limit: int, before: float | None = None) -> list[dict[str, Any]]:
        """Most recently created jobs, newest first, created strictly before `before`."""
        top = f"({before}" if before is not None else "+inf"
        ids = await self.redis.zrevrangebyscore(
            self.keys.recent, top, "-inf", start=0, num=limit, withscores=True
        )
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, _ in ids:
                pipe.hgetall(self.keys.job(job_id.decode()))
            rows = await pipe.execute()
        jobs = []
        for (job_id, score), fields in zip(ids, rows, strict=True):
            if fields:  # the job hash expired but the index entry has not been trimmed yet
                snap = _snapshot(job_id.decode(), fields)
                snap["cursor"] = score
                jobs.append(snap)
        return jobs


def _snapshot(job_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "job_id": job_id,
        "status": fields[b"state"].decode(),
        "seq": int(fields[b"seq"]),
        "final": fields.get(b"final") == b"1",
        "task": fields[b"task"].decode() if b"task" in fields else None,
        "created_at": float(fields[b"created"]),
        "updated_at": float(fields[b"updated"]),
        "progress": orjson.loads(fields[b"progress"]) if b"progress" in fields else None,
    }
    if b"result" in fields:
        snap["result"] = orjson.loads(fields[b"result"])
    if b"error" in fields:
        snap["error"] = orjson.loads(fields[b"error"])
    return snap
