"""Keepalive pings of every websocket on one event loop, on one timer.

Why: a timer per connection (the next ping, then the deadline of its pong) is, under
uvloop, a `TimerHandle` and a libuv timer: about 400 bytes an idle connection. Here a
connection's next step is an entry in a heap, and one timer waits for the earliest.

A connection that moves its step (its pong came: the next ping) or stops (it closed)
leaves its old entry behind, stale: its `keepalive_due` no longer matches. Stale entries
are dropped as they fall due, or all at once when they are most of the heap.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Pinged(Protocol):
    """A connection the schedule steps (`server.lean_ws.LeanWebSocket`)."""

    keepalive_due: float  # loop time of its entry in the schedule; 0.0: none

    def keepalive_step(self) -> None:
        """Its step is due: send the next ping, or give up on the pong awaited."""


class Keepalive:
    """The keepalive steps of the connections on one event loop (the next ping to send,
    or the deadline of the pong awaited): a heap of (when, n, connection), one timer."""

    __slots__ = ("loop", "_heap", "_count", "_handle", "_armed", "_stale")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Pinged]] = []
        self._count = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0.0
        self._stale = 0

    def at(self, when: float, ws: Pinged) -> None:
        """`ws`'s next step is at `when` (loop time); any earlier one is dropped."""
        if ws.keepalive_due:
            self._stale += 1
        ws.keepalive_due = when
        heap = self._heap
        heapq.heappush(heap, (when, next(self._count), ws))
        if self._stale > 64 and self._stale * 2 > len(heap):
            heap[:] = [entry for entry in heap if entry[2].keepalive_due == entry[0]]
            heapq.heapify(heap)
            self._stale = 0
        if self._handle is None or when < self._armed:
            self._arm(when)

    def drop(self, ws: Pinged) -> None:
        """`ws` takes no more steps (its entry stays, stale)."""
        if ws.keepalive_due:
            ws.keepalive_due = 0.0
            self._stale += 1

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = when
        self._handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        heap, now = self._heap, self.loop.time()
        while heap and heap[0][0] <= now:
            when, _, ws = heapq.heappop(heap)
            if ws.keepalive_due != when:
                self._stale = max(0, self._stale - 1)
                continue  # moved or stopped since
            ws.keepalive_due = 0.0
            try:
                ws.keepalive_step()
            except Exception:  # pragma: no cover - one connection's trouble is not the others'
                log.exception("keepalive of a websocket failed")
        if heap:
            self._arm(heap[0][0])


_local = threading.local()  # the schedule of the loop running in this thread


def schedule(loop: asyncio.AbstractEventLoop) -> Keepalive:
    """The schedule of `loop` (one per thread's running loop; a new loop, a new one)."""
    current: Keepalive | None = getattr(_local, "keepalive", None)
    if current is None or current.loop is not loop:  # the first, or another loop (tests)
        current = _local.keepalive = Keepalive(loop)
    return current
