"""Closing clients whose socket accepts nothing: the time half of the slow-client policy.

The size half is in `Feed` (a queue past `send_buffer_bytes`). This half catches a client
that stopped reading on a quiet stream, whose queue never grows: a send blocked longer
than `stall_timeout`, or a websocket keepalive ping unanswered that long, marks it too
slow, and its transport closes it (1013). The ping counts because a reader stalled on a
stream with little to send never blocks a send; uvicorn would close it 1011 at its ping
timeout, which `jobwire serve` sets past `stall_timeout` so the policy is jobwire's. One
task per process checks once a second, rather than a timer per connection, so an idle
connection costs no wake-ups.

It checks only the suspects, not every connection each second (issue 20: that scan was
~4 µs per delivery with many connections): a feed whose send blocks enters the set as it
does (`Feed.sending_since`), and one whose keepalive ping waits for its pong is found by a
sweep of all feeds on the first tick `timeout` seconds after the last sweep. That is soon
enough: a ping sent after a sweep and still unanswered is pending at the next sweep,
which is no later than the first tick that finds it stalled (more than `timeout` after
it), and is checked there. A suspect leaves the set on a tick that finds it neither
sending nor pinged (or once marked too slow). Which clients are closed, and on which tick,
is as with a scan of every connection each second.
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
        #: Feeds that may be stalled: a send blocked, or a ping unanswered, when last seen.
        #: Weak, like `_feeds`: a suspect whose connection is gone is not kept for the watch.
        self._suspects: weakref.WeakSet[Feed] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None

    def add(self, feed: Feed) -> None:
        self._feeds.add(feed)
        feed.stall_suspects = self._suspects
        if feed.sending_since is not None:
            feed.stall_suspected = True
            self._suspects.add(feed)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobwire-stall-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        swept = loop.time()
        while True:
            await asyncio.sleep(self._interval)
            now = loop.time()
            # A sweep on the first tick `timeout` after the last: a ping sent after that one
            # is pending at this one, or was answered; it is stalled only after `timeout`.
            sweep = now - swept >= self.timeout
            if sweep:
                swept = now
            self.check(now, sweep=sweep)

    def check(self, now: float, *, sweep: bool) -> None:
        """One tick: the suspects (and, on a sweep, every feed) checked at `now`."""
        suspects = self._suspects
        for feed in list(self._feeds if sweep else suspects):
            pinged = feed.ping_since() if feed.ping_since is not None else None
            sending = feed.sending_since
            reason = feed.core.stalled(now, self.timeout, sending, pinged)
            if reason is not None:
                feed.mark_too_slow(reason)
            elif sending is not None or pinged is not None:
                if not feed.stall_suspected:
                    feed.stall_suspected = True
                    suspects.add(feed)
                continue
            if feed.stall_suspected:
                feed.stall_suspected = False
                suspects.discard(feed)

    @property
    def suspects(self) -> int:
        """How many feeds the next tick checks (tests; a sweep checks every feed)."""
        return len(self._suspects)
