"""Closing clients whose socket accepts nothing: the time half of the slow-client policy.

The size half is in `Feed` (a queue past `send_buffer_bytes`). This half catches a client
that stopped reading on a quiet stream, whose queue never grows: a send blocked longer
than `stall_timeout`, or a websocket keepalive ping unanswered that long, marks it too
slow, and its transport closes it (1013). The ping counts because a reader stalled on a
stream with little to send never blocks a send; uvicorn would close it 1011 at its ping
timeout, which `jobwire serve` sets past `stall_timeout` so the policy is jobwire's. One
task per process scans the open feeds once a second, rather than a timer per connection,
so an idle connection costs no wake-ups.
"""

from __future__ import annotations

import asyncio
import weakref

from jobwire.server.feed import Feed


class StallWatch:
    def __init__(self, timeout: float, *, interval: float = 1.0) -> None:
        self.timeout = timeout
        self._interval = min(interval, timeout / 2)
        self._feeds: weakref.WeakSet[Feed] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None

    def add(self, feed: Feed) -> None:
        self._feeds.add(feed)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobwire-stall-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            now = loop.time()
            for feed in list(self._feeds):
                pinged = feed.ping_since() if feed.ping_since is not None else None
                reason = feed.core.stalled(now, self.timeout, feed.sending_since, pinged)
                if reason is not None:
                    feed.mark_too_slow(reason)
