"""Token buckets shared through Redis: one Lua script, one hash per bucket, Redis's clock.

Every process that takes from a bucket sees the same count, so a limit holds across server
processes, workers and machines (see `scripts/token_bucket.lua`). `AsyncBuckets` serves the
server (submits per user); `Buckets` serves workers (task limits, `jobwire.tasks.throttle`).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.asyncio import Redis

from jobwire import scripts
from jobwire.protocol import Keys


@dataclass(frozen=True, slots=True)
class Taken:
    """The answer of a bucket: allowed now, or how long until it would be."""

    allowed: bool  # taken now, or reserved (then `retry_after` says when it exists)
    retry_after: float  # seconds; 0 when taken now


class AsyncBuckets:
    """Token buckets for the async server (per-user submits)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._keys = keys
        self._script = redis.register_script(scripts.TOKEN_BUCKET)

    async def take(self, name: str, *, rate: float, capacity: float, tokens: float = 1) -> Taken:
        """Take `tokens` from bucket `name` (refilled at `rate` per second, up to `capacity`)."""
        taken, wait_ms = await self._script(keys=[self._keys.bucket(name)], args=[rate, capacity, tokens])
        return Taken(bool(taken), int(wait_ms) / 1000)


class Buckets:
    """Token buckets for workers: limits named by the app, with settings kept in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._script = client.register_script(scripts.TOKEN_BUCKET)

    def take(self, limit: str, bucket: str, *, rate: float, capacity: float, max_wait: float = 0.0) -> Taken:
        """One token from `bucket` of `limit` (settings from Redis when the limit is
        defined there, else `rate`/`capacity`); reserve one up to `max_wait` seconds ahead."""
        keys = [self._keys.limit_bucket(limit, bucket), self._keys.limit(limit)]
        taken, wait_ms = self._script(keys=keys, args=[rate, capacity, 1, max_wait])
        return Taken(bool(taken), int(wait_ms) / 1000)
