"""Following Celery apps that never imported jobwire, through their result backends.

Celery's Redis result backend PUBLISHes every state it stores (`update_state` included) on
the result key's own channel, `<global_keyprefix>celery-task-meta-<id>`. For each backend
in `JOBWIRE_CELERY_BACKENDS`, every server process holds one pattern subscription on that
backend, whatever the number of watchers, and records what it hears as jobwire events:
the job then streams, polls and lists exactly like a native one.

Sequence numbers, with several server processes: every process hears every publish and
records it, so each publish is offered to the record script once per process. The script
allocates seqs inside Redis and drops an offer whose digest (sha1 of the channel and the
payload) it has already recorded for that job (it keeps the last 256), so the stream stays
gap-free and free of duplicates, and a process that lags behind cannot append an old
state after a newer one. The one cost: a payload identical to one of the job's last 256
(the same state with the same meta) is recorded once; delivery is about state, so nothing
a client sees changes.

Gaps in what the bridge heard (a backend unreachable for a while, a server started after
the job) are closed from Celery's own result key: on reconnect for every foreign job not
final yet, and on demand for an id jobwire has never seen (`seed`). An id neither side
knows stays unknown (404), where `AsyncResult` would say PENDING forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from jobwire import scripts
from jobwire.backoff import backoff
from jobwire.foreign import ForeignBackend, digest, event_from_meta
from jobwire.protocol import FINAL_STATES, JobwireError, check_job_id
from jobwire.record import MISSING, Owner, RecordCall, index_commands, parent_call, parse_reply, record_call
from jobwire.settings import Settings

log = logging.getLogger(__name__)


class Bridge:
    """Follows foreign result backends and records their publishes (see module docstring)."""

    def __init__(self, redis: Redis | RedisCluster, settings: Settings) -> None:
        self.redis, self.settings = redis, settings
        self.backends = tuple(ForeignBackend.parse(spec) for spec in settings.celery_backends)
        self._record = redis.register_script(scripts.RECORD)
        self._clients = {
            b: Redis.from_url(b.url, socket_connect_timeout=2, socket_timeout=10) for b in self.backends
        }
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = {b: False for b in self.backends}

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow(b), name=f"jobwire-bridge-{b.url}") for b in self.backends
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for client in self._clients.values():
            await client.aclose()

    async def seed(self, job_ids: Sequence[str]) -> None:
        """Record the current state of any of `job_ids` a followed backend holds: ids
        jobwire has not seen (its server started after them, or missed their publishes)."""
        for backend in self.backends:
            try:
                values = await self._clients[backend].mget([backend.key(j) for j in job_ids])
            except (RedisError, OSError) as exc:
                log.warning("jobwire bridge: cannot read %s: %s", backend.url, exc)
                continue
            for job_id, value in zip(job_ids, values, strict=True):
                if value is not None:
                    await self._heard(backend, backend.key(job_id).encode(), value)

    async def _follow(self, backend: ForeignBackend) -> None:
        delays = backoff(0.1, 5.0)
        while True:
            pubsub = self._clients[backend].pubsub()
            try:
                await pubsub.psubscribe(backend.pattern)
                self.connected[backend] = True
                delays = backoff(0.1, 5.0)
                await self._catch_up(backend)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is not None and msg["type"] == "pmessage":
                        await self._heard(backend, msg["channel"], msg["data"])
            except (RedisError, OSError) as exc:
                if self.connected[backend]:
                    log.warning("jobwire bridge: lost %s (%s); reconnecting", backend.url, exc)
            finally:
                self.connected[backend] = False
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(next(delays))

    async def _catch_up(self, backend: ForeignBackend) -> None:
        """After (re)subscribing: what changed while nobody listened, for the jobs not
        final yet, from Celery's result keys."""
        ids = [j.decode() for j in await self.redis.smembers(self.settings.keys.foreign_live(backend.url))]
        for i in range(0, len(ids), 500):
            await self.seed(ids[i : i + 500])

    async def _heard(self, backend: ForeignBackend, channel: bytes, payload: bytes) -> None:
        try:
            job_id = backend.job_id(channel.decode())
            if job_id is None:
                return
            check_job_id(job_id)
            meta = orjson.loads(payload)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object (jobwire reads JSON results only)")
        except (JobwireError, ValueError) as exc:
            log.warning("jobwire bridge: ignoring a publish on %.120r (%s)", channel, exc)
            return
        state, fields = event_from_meta(meta)
        try:
            await self._record_event(backend, job_id, state, fields, digest(channel, payload))
        except (RedisError, OSError) as exc:
            log.warning("jobwire bridge: could not record %s %s: %s", job_id, state, exc)

    async def _record_event(
        self, backend: ForeignBackend, job_id: str, state: str, fields: dict[str, Any], event_id: str
    ) -> None:
        """Record one publish heard, with the steps every writer takes after the record
        script (`jobwire.record`): index a job it created, and count a final event in the
        job's group or chord.

        A job heard here can have a group: the server's group submit records each child
        with its parent as it publishes it, and when the app's workers never attached
        jobwire, this is the only writer to hear the child end. Whichever writer records
        a child's end first counts it; a later one is refused, the job being final.
        """
        owner = Owner(backend.tenant, "") if backend.tenant else None
        call = record_call(
            self.settings, job_id, state, event_id=event_id, owner=owner, dedupe=True, **fields
        )
        reply = parse_reply(await self._record(keys=call.keys(), args=call.argv()))
        if reply is None:
            return  # heard already (by this process or another), or the job is final
        count = parent_call(
            self.settings,
            reply,
            state,
            result=fields.get("result", MISSING),
            error=fields.get("error"),
            owner=owner,
        )
        created: list[RecordCall] = [call] if reply.created else []
        if count is not None:
            counted = parse_reply(await self._record(keys=count.keys(), args=count.argv()))
            if counted is not None and counted.created:
                created.append(count)
        live = self.settings.keys.foreign_live(backend.url)
        async with self.redis.pipeline(transaction=False) as pipe:
            for new in created:
                index_commands(pipe, self.settings, new.job_id, new.ts, owner)
            if state in FINAL_STATES:
                pipe.srem(live, job_id)
            elif reply.created:
                pipe.sadd(live, job_id)
            await pipe.execute()
