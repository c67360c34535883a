"""Reads of job state for the server (writes belong to `jobwire.tasks.recorder`).

No endpoint spells out a Redis command: they all come here, each read in one round trip.
Every read takes the caller's `Principal`: a job it may not see reads as one that does not
exist, here, in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster

from jobwire import scripts
from jobwire.protocol import UNKNOWN, JobNotFound, JobwireError, Keys, key_id
from jobwire.server.auth import Principal
from jobwire.server.events import Delivery


@dataclass(frozen=True, slots=True)
class Stream:
    """A job's stream as read: which incarnation (`epoch`), how far it got, and events."""

    epoch: str | None
    seq: int
    events: list[Delivery]
    lost: int = 0  # the highest seq trimmed although it was a transition (history_max)


class JobStore:
    """Async reads of jobwire's Redis keys."""

    def __init__(self, redis: Redis | RedisCluster, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._batch = redis.register_script(scripts.BATCH_STATUS)
        # Set when foreign Celery backends are followed: ids jobwire has not seen are
        # looked up there (and recorded) before they are called unknown.
        self.seed: Callable[[Sequence[str]], Awaitable[None]] | None = None

    async def snapshot(self, job_id: str, principal: Principal) -> dict[str, Any] | None:
        """The job's current state for polling clients, or None if it was never seen (or
        `principal` may not see it)."""
        fields = await self.redis.hgetall(self.keys.job(job_id))
        if not fields and self.seed is not None:
            await self.seed([job_id])
            fields = await self.redis.hgetall(self.keys.job(job_id))
        if not fields or not principal.may_see(job_id, _tenant(fields.get(b"tenant"))):
            return None
        return _snapshot(job_id, fields)

    async def require(self, job_id: str, principal: Principal) -> dict[str, Any]:
        """The job's snapshot, or `JobNotFound`: one answer for "never existed" and "not yours"."""
        snapshot = await self.snapshot(job_id, principal)
        if snapshot is None:
            raise JobNotFound(job_id)
        return snapshot

    async def events_since(self, job_id: str, since: int, principal: Principal) -> Stream | None:
        """The job's stream after `since` (its epoch, latest seq and retained events with
        seq > `since`, in order); None if it does not exist for `principal`."""
        stream = await self._events_since(job_id, since, principal)
        if stream is None and self.seed is not None:
            await self.seed([job_id])
            stream = await self._events_since(job_id, since, principal)
        return stream

    async def _events_since(self, job_id: str, since: int, principal: Principal) -> Stream | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.job(job_id), "created", "tenant", "epoch", "seq", "lost")
            pipe.zrangebyscore(self.keys.history(job_id), f"({since}", "+inf")
            (created, tenant, epoch, seq, lost), raws = await pipe.execute()
        if created is None or not principal.may_see(job_id, _tenant(tenant)):
            return None
        events = [Delivery.parse(raw) for raw in raws]
        return Stream(_tenant(epoch), int(seq or 0), events, int(float(lost or 0)))

    async def visible(self, job_ids: Sequence[str], principal: Principal) -> set[str]:
        """Which of `job_ids` exist for `principal`, in one command (the batch-status
        script): lets a subscribe of many ids skip, cheaply, the ones it will never watch.
        Not a pipeline of one HMGET per id: packing and parsing a thousand commands in
        redis-py took 12 ms of the event loop per subscribe of 1,000 ids, which a flood of
        such subscribes turned into every other client's latency."""
        found = await self._visible(job_ids, principal)
        if self.seed is not None and len(found) < len(job_ids):
            missing = [j for j in job_ids if j not in found]
            await self.seed(missing)
            found |= await self._visible(missing, principal)
        return found

    async def _visible(self, job_ids: Sequence[str], principal: Principal) -> set[str]:
        rows = await self._batch_rows(job_ids)
        # A row is [state, seq, final, tenant, epoch]; a job without a state was never seen.
        return {j for j, row in rows.items() if row[0] and principal.may_see(j, row[3] or None)}

    async def batch_status(self, job_ids: Sequence[str], principal: Principal) -> dict[str, dict[str, Any]]:
        """Status of many jobs in one Redis command (a Lua script), whatever the count."""
        if not job_ids:
            return {}
        rows = await self._batch_rows(job_ids)
        unseen = [j for j in job_ids if not rows[j][0]]
        if unseen and self.seed is not None:
            await self.seed(unseen)
            rows.update(await self._batch_rows(unseen))
        out: dict[str, dict[str, Any]] = {}
        for job_id in job_ids:
            state, seq, final, tenant, epoch = rows[job_id]
            if not state or not principal.may_see(job_id, tenant or None):
                out[job_id] = {"status": UNKNOWN, "ready": False, "seq": 0}
            else:
                ready, epoch = final == "1", epoch or None
                out[job_id] = {"status": state, "ready": ready, "seq": int(seq), "epoch": epoch}
        return out

    async def _batch_rows(self, job_ids: Sequence[str]) -> dict[str, list[Any]]:
        """Each id's [state, seq, final, tenant, epoch] (str, or False where unset)."""
        if isinstance(self.redis, RedisCluster):
            return await self._batch_per_node(job_ids)
        rows = orjson.loads(await self._batch(args=self._batch_args(job_ids)))
        return dict(zip(job_ids, rows, strict=True))

    def _batch_args(self, job_ids: Sequence[str]) -> list[str]:
        head, tail = self.keys.job("-").split("-")  # "-" is its own key form
        return [head, tail, " ".join(key_id(j) for j in job_ids)]  # key forms hold no spaces

    async def _batch_per_node(self, job_ids: Sequence[str]) -> dict[str, list[Any]]:
        """The batch script once per cluster node, for the ids it holds, all at once: one
        round trip per node, whatever the count."""
        assert isinstance(self.redis, RedisCluster)
        # The slot map is read on a cluster client's first command: before any, every slot
        # is "not covered" to get_node_from_key (a no-op once initialized).
        await self.redis.initialize()
        by_node: dict[str, tuple[Any, list[str]]] = {}
        for job_id in job_ids:
            node = self.redis.get_node_from_key(self.keys.job(job_id))
            by_node.setdefault(node.name, (node, []))[1].append(job_id)

        async def one(node: Any, ids: list[str]) -> dict[str, list[Any]]:
            args = self._batch_args(ids)
            eval_ = self.redis.execute_command
            reply = await eval_("EVAL", scripts.BATCH_STATUS, 0, *args, target_nodes=node)
            return dict(zip(ids, orjson.loads(reply), strict=True))

        rows: dict[str, list[Any]] = {}
        for part in await asyncio.gather(*(one(node, ids) for node, ids in by_node.values())):
            rows.update(part)
        return rows

    async def children(self, job_id: str, offset: int, limit: int) -> tuple[int, list[str]]:
        """A group's child count and a page of its child ids (the caller checked the group)."""
        key = self.keys.children(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(key)
            pipe.lrange(key, offset, offset + limit - 1)
            total, ids = await pipe.execute()
        return int(total), [i.decode() for i in ids]

    async def recent(
        self, principal: Principal, *, limit: int, before: float | None = None
    ) -> list[dict[str, Any]]:
        """Most recently created jobs the principal may see, newest first, created strictly
        before `before`: every job for an admin, the tenant's own for anyone else."""
        if principal.jobs is not None:
            raise JobwireError("forbidden", "this token may watch its own job only; it cannot list jobs")
        if principal.sees_every_tenant:
            index = self.keys.recent
        elif principal.tenant is not None:
            index = self.keys.tenant_recent(principal.tenant)
        else:
            return []
        top = f"({before}" if before is not None else "+inf"
        ids = await self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit, withscores=True)
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


def _tenant(raw: bytes | None) -> str | None:
    return raw.decode() if raw is not None else None


def _snapshot(job_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "job_id": job_id,
        "status": fields[b"state"].decode(),
        "seq": int(fields[b"seq"]),
        "epoch": _tenant(fields.get(b"epoch")),
        "final": fields.get(b"final") == b"1",
        "task": fields[b"task"].decode() if b"task" in fields else None,
        "created_at": float(fields[b"created"]),
        "updated_at": float(fields[b"updated"]),
        "progress": orjson.loads(fields[b"progress"]) if b"progress" in fields else None,
    }
    if b"parent" in fields:
        snap["parent"] = fields[b"parent"].decode()  # a group's or chord's child
    if b"result" in fields:
        snap["result"] = orjson.loads(fields[b"result"])
    if b"error" in fields:
        snap["error"] = orjson.loads(fields[b"error"])
    return snap
