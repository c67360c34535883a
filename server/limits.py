"""Per-process limits on what one client can take: connections per user and per address,
and the pace of one socket's messages.

In-process on purpose: they bound what one server process holds. (Submits per user are
counted in Redis instead, across processes: see `jobwire.ratelimit`.)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson


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

    def opening(self, address: str) -> bool:
        """May `address` open one more connection now (by pace)? Paces of addresses that
        are idle again are dropped, so the map stays as small as the set of active ones."""
        pace = self._paces.get(address)
        if pace is None:
            if len(self._paces) > 10_000:
                self._paces = {a: p for a, p in self._paces.items() if not p.full()}
            pace = self._paces[address] = Pace(self.new_per_second)
        return pace.take()

    def acquire(self, user: str | None, address: str) -> str | None:
        """Count one more connection; None if allowed, else why not (nothing counted).
        `user` None counts the address only (no authentication: everyone is one user)."""
        if user is not None and self._users[user] >= self.per_user:  # the user first: their limit
            return f"too many connections for this user (at most {self.per_user})"
        if self._addresses[address] >= self.per_address:
            return f"too many connections from this address (at most {self.per_address})"
        if user is not None:
            self._users[user] += 1
        self._addresses[address] += 1
        return None

    def acquire_user(self, user: str | None) -> str | None:
        """Count a user on a connection whose address is already counted."""
        if user is None:
            return None
        if self._users[user] >= self.per_user:
            return f"too many connections for this user (at most {self.per_user})"
        self._users[user] += 1
        return None

    def release(self, user: str | None, address: str) -> None:
        for counter, key in ((self._users, user), (self._addresses, address)):
            if key is not None:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]


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

    def full(self) -> bool:
        return self.tokens + (time.monotonic() - self.stamp) * self.rate >= self.capacity


class HeaderLimit:
    """ASGI middleware: refuse a request (431) or websocket (closed before the upgrade)
    whose headers exceed `limit` bytes. uvicorn bounds heads only with its h11 parser;
    this holds with httptools too."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
            if size > self.limit:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1009})
                    return
                body = orjson.dumps(
                    {
                        "error": {
                            "code": "headers_too_large",
                            "message": f"request headers over {self.limit} bytes",
                        }
                    }
                )
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 431, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
