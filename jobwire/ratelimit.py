"""Token buckets shared through Redis: one Lua script, one hash per bucket, Redis's clock.

Every process that takes from a bucket sees the same count, so a limit holds across server
processes and machines (see `scripts/token_bucket.lua`).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from jobwire import scripts
from jobwire.protocol import Keys


@dataclass(frozen=True, slots=True)
class Taken:
    """The answer of a bucket: allowed now, or how long until it would be."""

    allowed: bool
    retry_after: float  # seconds; 0 when allowed


class AsyncBuckets:
    """Token buckets for the async server (per-user submits)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._keys = keys
        self._script = redis.register_script(scripts.TOKEN_BUCKET)

    async def take(self, name: str, *, rate: float, capacity: float, tokens: float = 1) -> Taken:
        """Take `tokens` from bucket `name` (refilled at `rate` per second, up to `capacity`)."""
        taken, wait_ms = await self._script(keys=[self._keys.bucket(name)], args=[rate, capacity, tokens])
        return Taken(bool(taken), int(wait_ms) / 1000)
