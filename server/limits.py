"""Per-process limits on what one client can take: connections per user and per address,
and the pace of one socket's messages.

In-process on purpose: they bound what one server process holds. (Submits per user are
counted in Redis instead, across processes: see `jobwire.ratelimit`.)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

from jobwire.protocol import JobwireError


@dataclass(frozen=True)
class Refusal:
    """Why a connection was refused for load, and when to come back: a client gets it as
    429 with `Retry-After` (or a websocket closed 1013), never as a final refusal."""

    reason: str  # the metric's label: "pace", "address" or "user"
    message: str
    retry_after: int  # seconds

    def error(self) -> JobwireError:
        """As the REST/SSE error (429 too_many_connections, with `Retry-After`)."""
        return JobwireError("too_many_connections", self.message, retry_after=self.retry_after)


#: Seconds a client refused for holding too many connections is asked to wait: slots free
#: up as other connections end, which no one can predict; clients add their own jitter.
RETRY_AFTER_FULL = 2


@dataclass
class Connections:
    """Open websockets and SSE streams, counted per user and per client address, and the
    pace at which one address may open new ones (a burst of `2 × new_per_second`)."""

    per_user: int
    per_address: int
    new_per_second: float = 20.0
    _users: Counter[str] = field(default_factory=Counter)
    _addresses: Counter[str] = field(default_factory=Counter)
    _paces: dict[str, Pace] = field(default_factory=dict)

    def opening(self, address: str) -> Refusal | None:
        """May `address` open one more connection now (by pace)? None if so. Paces of
        addresses that are idle again are dropped, so the map stays as small as the set of
        active ones."""
        pace = self._paces.get(address)
        if pace is None:
            if len(self._paces) > 10_000:
                self._paces = {a: p for a, p in self._paces.items() if not p.full()}
            pace = self._paces[address] = Pace(self.new_per_second)
        if pace.take():
            return None
        return Refusal(
            "pace",
            f"too many new connections from this address (at most {self.new_per_second:g}/s); retry later",
            max(1, math.ceil(pace.wait())),
        )

    def acquire(self, user: str | None, address: str) -> Refusal | None:
        """Count one more connection; None if allowed, else why not (nothing counted).
        `user` None counts the address only (no authentication: everyone is one user)."""
        if user is not None and self._users[user] >= self.per_user:  # the user first: their limit
            return self._full("user", self.per_user)
        if self._addresses[address] >= self.per_address:
            return self._full("address", self.per_address)
        if user is not None:
            self._users[user] += 1
        self._addresses[address] += 1
        return None

    def acquire_user(self, user: str | None) -> Refusal | None:
        """Count a user on a connection whose address is already counted."""
        if user is None:
            return None
        if self._users[user] >= self.per_user:
            return self._full("user", self.per_user)
        self._users[user] += 1
        return None

    def release(self, user: str | None, address: str) -> None:
        for counter, key in ((self._users, user), (self._addresses, address)):
            if key is not None:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    @staticmethod
    def _full(who: str, limit: int) -> Refusal:
        whose = "this user" if who == "user" else "this address"
        message = f"too many connections for {whose} (at most {limit}); retry later"
        return Refusal(who, message, RETRY_AFTER_FULL)


class Pace:
    """A local token bucket: `rate` per second, bursts of 2×`rate`."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, 2 * rate
        self.tokens, self.stamp = self.capacity, time.monotonic()
        self.refused = 0  # messages refused since the last one taken

    def take(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens (a message that asks for more work costs more)."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < cost:
            self.refused += 1
            return False
        self.tokens -= cost
        self.refused = 0
        return True

    def wait(self, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens are there (0 if they are now)."""
        return max(0.0, (cost - self.tokens) / self.rate)

    def full(self) -> bool:
        return self.tokens + (time.monotonic() - self.stamp) * self.rate >= self.capacity
