"""Refused connections, said in jobwire's log: why, from where, and what to change.

A browser tells a page almost nothing of a refused websocket: a 403 before the upgrade is a
bare failed connection (no status, no body), and an EventSource refused with a 401 shows
no JSON either. An adopter whose page and server sat on two origins saw only uvicorn's
"connection rejected (403 Forbidden)". So every refusal of a websocket or an SSE stream is
said here, once, with the client's address: the Origin and the variable that allows it, the
token's fault, the limit that was reached, the transport that is off, the bad parameter.

A flood of refusals (a page reconnecting in a thousand tabs, or an attack) must not become
a flood of lines. Per transport and reason, the first refusal is said at once; those after
it within `every` seconds are counted, and said as one line when that window ends (with
the last one's address and detail), so a steady flood costs one line per window.

When the services stop, `close` says what the open windows counted, at once, and cancels
their timers: a timer left running said its line after the server had stopped (or never,
on a loop that closed first). Said, not dropped: those refusals happened, and the last
window's count is what an operator reading the shutdown wants to see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: How loudly each reason is said. An Origin refused or a limit reached is the server's
#: configuration meeting its users (an operator acts on it); a bad token, a transport
#: that is off or a bad parameter is the client's to fix, and said calmly.
LEVELS = {
    "forbidden": logging.WARNING,
    "load": logging.WARNING,
    "unauthenticated": logging.INFO,
    "transport_off": logging.INFO,
    "bad_request": logging.INFO,
}

#: Seconds over which repeated refusals for one reason are counted into one line.
EVERY = 10.0


@dataclass
class _Window:
    until: float
    count: int = 0  # refusals counted, not yet said
    last: str = ""
    timer: asyncio.TimerHandle | None = None


class RefusalLog:
    """Says each refused connection in the log, at most one line per transport and reason
    per `every` seconds (see the module docstring)."""

    def __init__(
        self,
        *,
        every: float = EVERY,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every, self._log, self._clock = every, logger, clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._closed = False

    def __call__(self, kind: str, reason: str, detail: str, client: str) -> None:
        """A `kind` connection ("websocket", "sse") from `client` was refused for `reason`
        (a `Disconnect` label: forbidden, load, unauthenticated, transport_off,
        bad_request); `detail` says what to change."""
        key, now = (kind, reason), self._clock()
        line = f"from {client}: {detail}"
        if self._closed:  # stopping: said at once, no window left open to a timer
            self._log.log(LEVELS.get(reason, logging.INFO), "%s refused (%s) %s", kind, reason, line)
            return
        window = self._windows.get(key)
        if window is None or now >= window.until:
            if window is not None:
                self._say_counted(key, window)  # no timer ran (no event loop): say them now
            self._log.log(LEVELS.get(reason, logging.INFO), "%s refused (%s) %s", kind, reason, line)
            self._windows[key] = _Window(until=now + self.every)
            return
        window.count += 1
        window.last = line
        if window.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            window.timer = loop.call_later(window.until - now, self._end_window, key)

    def close(self) -> None:
        """The services stop: say every count not yet said, now, and cancel the timers
        that would have said them (see the module docstring). Refusals after this are
        said one line each."""
        self._closed = True
        windows, self._windows = self._windows, {}
        for key, window in windows.items():
            self._say_counted(key, window)

    def _end_window(self, key: tuple[str, str]) -> None:
        window = self._windows.pop(key, None)
        if window is None or not window.count:
            return
        self._say_counted(key, window)
        # Still flooding, perhaps: the next refusals are counted into a window of their own.
        self._windows[key] = _Window(until=self._clock() + self.every)

    def _say_counted(self, key: tuple[str, str], window: _Window) -> None:
        if window.timer is not None:
            window.timer.cancel()
        if window.count:
            kind, reason = key
            self._log.log(
                LEVELS.get(reason, logging.INFO),
                "%s refused (%s) %d more time(s) in the last %gs; the last %s",
                kind,
                reason,
                window.count,
                self.every,
                window.last,
            )
            window.count = 0
