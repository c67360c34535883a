"""Per-process limits on what one client can take: connections per user and per address,
and the pace of one socket's messages.

In-process on purpose: they bound what one server process holds. (Submits per user are
counted in Redis instead, across processes: see `jobwire.ratelimit`.)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Connections:
    """Open websockets and SSE streams, counted per user and per client address."""

    per_user: int
    per_address: int
    _users: Counter[str] = field(default_factory=Counter)
    _addresses: Counter[str] = field(default_factory=Counter)

    def acquire(self, user: str | None, address: str) -> str | None:
        """Count one more connection; None if allowed, else why not (nothing counted).
        `user` None counts the address only (no authentication: everyone is one user)."""
        if user is not None and self._users[user] >= self.per_user:
            return f"too many connections for this user (at most {self.per_user})"
        if self._addresses[address] >= self.per_address:
            return f"too many connections from this address (at most {self.per_address})"
        if user is not None:
            self._users[user] += 1
        self._addresses[address] += 1
        return None

    def release(self, user: str | None, address: str) -> None:
        for counter, key in ((self._users, user), (self._addresses, address)):
            if key is not None:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]


class Pace:
    """A token bucket for one socket's messages: `rate` per second, bursts of 2×`rate`."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, 2 * rate
        self.tokens, self.stamp = self.capacity, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
