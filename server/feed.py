"""One client's stream: the driver of `jobwire.stream.ClientStream` for one connection.

Every transport (websocket, single-job websocket, SSE) reads from a `Feed`, so the rules
hold the same way for all of them. The rules themselves (order, dedupe, gaps, epochs,
coalescing progress while transitions keep their places, the byte budget) are the pure
core's, in `jobwire.stream`; this module does what the core cannot: it subscribes on the
hub, reads history, sleeps until there is something to send, and writes a ready-made
frame directly when the transport can take it (`write_now`).

Subscribe without loss: the feed subscribes on the hub first and waits for Redis to
confirm, *then* reads the job's history after `since`, then forwards live events. An event
published between the two is both in history and in the live queue; the core's per-job
seq drops the second copy.

A client whose queue passes `max_bytes` as live events arrive, or whose socket accepts
nothing for a while (see `StallWatch`), is `too_slow`: its transport closes it (1013) and
it resumes by seq.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from weakref import WeakSet

from jobwire.protocol import JobNotFound, JobwireError, Keys
from jobwire.server.auth import Principal
from jobwire.server.hub import Fanout, Sink
from jobwire.server.store import JobStore
from jobwire.stream import ClientStream, Item

__all__ = ["Feed", "Item", "reply_refused"]


class Feed:
    """The events of the jobs one client watches (see module docstring)."""

    def __init__(
        self,
        hub: Fanout,
        store: JobStore,
        keys: Keys,
        principal: Principal,
        *,
        queue_limit: int,
        max_jobs: int,
        max_bytes: int = 1 << 20,
    ) -> None:
        self._hub, self._store, self._keys, self._principal = hub, store, keys, principal
        self._max_jobs = max_jobs
        self.core = ClientStream(keys, queue_limit=queue_limit, max_bytes=max_bytes)
        self.core.wake = self._woken  # type: ignore[method-assign]
        self.core.perform = self._perform  # type: ignore[method-assign]
        # The hub's sinks are the core's own methods: one call per event and watcher.
        self._job_sink: Sink = self.core.live
        self._all_sink: Sink = self.core.live_all
        #: The next queued item if it is an event, else None: for joining events into one
        #: write. It never handles the inbox, so nothing is written directly meanwhile, while
        #: the transport holds events it has taken but not sent. (The core's own method:
        #: called once per event of a batch.)
        self.next_queued_event: Callable[[], Item | None] = self.core.pop_event
        self.on_too_slow: Callable[[str], None] | None = None  # the transport's, to close it
        self._sending_since: float | None = None
        #: The stall watch's set of suspects (see `StallWatch`): a blocked send enters it.
        self.stall_suspects: WeakSet[Feed] | None = None
        self.stall_suspected = False  # in `stall_suspects`: a send enters it once
        # The transport's: since when its keepalive ping waits for a pong (see StallWatch)
        self.ping_since: Callable[[], float | None] | None = None
        # Set while the writer sleeps: a future per sleep, not an asyncio.Event per feed,
        # because an idle connection should cost as little as possible.
        self._waiter: asyncio.Future[bool] | None = None  # its result: the idle timer fired
        self._idle_timer: asyncio.TimerHandle | None = None  # while the waiter sleeps (`_idle_tick`)
        self.closing = False
        self._all_channel = _all_channel(keys, principal)

    # -- the transport's hooks -------------------------------------------------------------

    @property
    def write_now(self) -> Callable[[bytes, int], bool] | None:
        """The transport's direct write of a ready-made frame (see `server.direct`), used
        only when nothing waits in the queue or is being sent, so the order holds."""
        return self.core.write_now

    @write_now.setter
    def write_now(self, write: Callable[[bytes, int], bool] | None) -> None:
        self.core.land()  # (a lane writes with the writer it was given)
        self.core.write_now = write

    @property
    def write_finals(self) -> bool:
        """False: a final event goes through the queue (to close after it)."""
        return self.core.write_finals

    @write_finals.setter
    def write_finals(self, value: bool) -> None:
        self.core.write_finals = value

    @property
    def sending_since(self) -> float | None:
        """Set by the transport while a send is blocked (see StallWatch)."""
        return self._sending_since

    @sending_since.setter
    def sending_since(self, since: float | None) -> None:
        self._sending_since = since
        if since is not None and self.core.riding:
            self.core.land()  # nothing is written directly during a send
        self.core.sending = since is not None
        if since is not None and not self.stall_suspected and self.stall_suspects is not None:
            self.stall_suspected = True
            self.stall_suspects.add(self)

    @property
    def too_slow(self) -> str | None:
        return self.core.too_slow

    # -- what the client asks for --------------------------------------------------------

    async def watch(self, job_id: str, since: int = 0, epoch: str | None = None) -> bool:
        """Deliver `job_id`'s events after `since`, then its live ones.

        `epoch` is the incarnation `since` counts in. If the job's history was lost and
        began again since (another epoch, or fewer events than `since`), the client is
        told (`reset`) and gets the new history from the start.

        Returns False (and watches nothing) if the job was never seen, or the principal
        may not see it: the two are one answer. Watching a job
        already watched is a no-op: its stream simply continues. Raises `JobwireError`
        (too_many_jobs), or `HubUnavailable` when Redis cannot be reached.
        """
        core = self.core
        if job_id in core.last:
            return True
        if len(core.last) >= self._max_jobs:
            raise JobwireError("too_many_jobs", f"a connection may watch at most {self._max_jobs} jobs")
        core.begin(job_id, since, epoch)
        try:
            await self._hub.subscribe(self._keys.job_channel(job_id), self._job_sink)
            page = await self._store.events_since(job_id, since, self._principal)
            if job_id not in core.last:
                return True  # the feed closed during the read (too slow): nothing more to say
            if page is not None and core.first_page(job_id, page, epoch, since):
                await self._reset(job_id, page.epoch)
        except BaseException:
            self.unwatch(job_id)
            raise
        if job_id not in core.last:
            return True  # (the same, during the reset's read)
        if page is None:
            self.unwatch(job_id)
            return False
        self._perform()
        core.subscribed(job_id)
        self._wake()
        return True

    async def watch_many(
        self, since: dict[str, int], *, job_ids: list[str], epochs: dict[str, str] | None = None
    ) -> dict[str, JobwireError]:
        """Watch each of `job_ids` (from its `since`, in its `epochs`); return why each one
        that could not be watched was not (job_not_found, too_many_jobs). One read first
        tells which exist for this principal, so unknown ids cost no subscription: a flood
        of them costs one pipelined read per message."""
        visible = await self._store.visible(job_ids, self._principal) if job_ids else set()
        refused: dict[str, JobwireError] = {}
        for job_id in job_ids:
            if job_id not in visible:
                refused[job_id] = _UNKNOWN  # one shared error: a flood of ids builds none
                continue
            try:
                epoch = (epochs or {}).get(job_id)
                if not await self.watch(job_id, since.get(job_id, 0), epoch):
                    refused[job_id] = _UNKNOWN
            except JobwireError as exc:
                refused[job_id] = exc
        return refused

    def unwatch(self, job_id: str) -> None:
        if self.core.end(job_id):
            self._hub.unsubscribe(self._keys.job_channel(job_id), self._job_sink)

    async def watch_all(self) -> None:
        """Also deliver the live events of every job the principal may see (dashboards):
        all jobs for an admin, the tenant's for anyone else."""
        if self._all_channel is None:
            raise JobwireError("forbidden", "this token may watch its own job only")
        if not self.core.all:
            self.core.watch_all()
            try:
                await self._hub.subscribe(self._all_channel, self._all_sink)
            except BaseException:
                self.core.unwatch_all()
                raise

    def unwatch_all(self) -> None:
        if self.core.all:
            self.core.unwatch_all()
            assert self._all_channel is not None
            self._hub.unsubscribe(self._all_channel, self._all_sink)

    def post(self, message: dict[str, Any]) -> None:
        """Queue a control message (a reply to the client) in order with the events."""
        self.core.post(message)
        self._wake()

    def mark_too_slow(self, reason: str) -> None:
        """The client cannot keep up: stop queueing for it; its transport closes it (1013)."""
        if self.core.too_slow is None:
            self.core.mark_too_slow(reason)
            self._too_slow_now()

    def _too_slow_now(self) -> None:
        self.closing = True  # the stream ends without `end`: the client resumes
        self._wake()
        self.close()
        if self.on_too_slow is not None and self.core.too_slow is not None:
            self.on_too_slow(self.core.too_slow)

    @property
    def exhausted(self) -> bool:
        """Nothing is queued and nothing more can arrive: every watched job has ended and
        the all-jobs stream is off (or the server is going away). A stream that only
        sends keepalives from here on should end."""
        return self.closing or not (self.core.following or self.core.all or self.core.queued)

    def shutdown(self) -> None:
        """The server is going away: end the stream now; the client reconnects and resumes."""
        self.closing = True
        self.close()
        self._wake()

    def close(self) -> None:
        for job_id in list(self.core.last):
            self.unwatch(job_id)
        self.unwatch_all()

    # -- what the client receives --------------------------------------------------------

    async def next(self, idle: float | None = None) -> Item | None:
        """The next event or control message for the client, waiting if there is none.

        Returns None after `idle` seconds with nothing to send (time for a heartbeat).
        Only that idle wait is timed out, never a history read in flight, so no event
        can be lost to the timeout.
        """
        core = self.core
        while True:
            item = core.pop()
            if item is not None:
                return item
            needed = core.need()
            self._perform()  # a final event handled from the inbox ends its subscription
            if isinstance(needed, str):
                await self._backfill(needed)
            elif needed is not None:
                for job_id in needed:
                    await self._backfill(job_id)
            elif core.queued:
                continue
            elif await self._sleep(idle) or self.exhausted:
                return None  # idle (time for a heartbeat), or nothing more will come

    def next_nowait(self) -> Item | None:
        """The next item if it is ready without reading Redis, else None.

        Lets a writer drain a burst without a task and a wait per event; anything that
        needs history (a gap, a resync) is left for `next()`.
        """
        core = self.core
        while True:
            item = core.pop()
            if item is not None:
                return item
            if not core.ready_without_reads():
                return None
            self._perform()

    @property
    def queued_bytes(self) -> int:
        """What waits for this client, in bytes (events as sent, control messages as 64)."""
        return self.core.queued_bytes

    # -- internals -----------------------------------------------------------------------

    async def _sleep(self, idle: float | None) -> bool:
        """Wait for something to do; True if `idle` seconds passed with nothing sent.

        A timer that wakes the waiter, rather than `wait_for`: that costs a task per
        wait (per event, at fan-out rates), and on Python 3.11 it can swallow a
        cancellation that coincides with the waiter completing, which hangs shutdown.

        Events written directly (`write_now`) do not wake the writer, so its idle timer
        alone would send a heartbeat every `idle` seconds to a client that had events all
        along. The timer looks every `idle / 2` seconds instead (`_idle_tick`) and wakes
        the writer for a heartbeat only where it may otherwise be silent for `idle`.
        """
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if idle:
            self._idle_timer = loop.call_later(idle / 2, self._idle_tick, waiter, idle, None)
        try:
            timed_out = await waiter
        finally:
            self._waiter = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        return timed_out and not self.core.queued

    def _idle_tick(self, waiter: asyncio.Future[bool], idle: float, seen: int | None) -> None:
        """Half an idle interval passed; `seen`: `_handed_on()` at the tick before (None on
        the first tick, half an interval after the sleep began: nothing read per sleep).

        Without a clock per write, a change since the last tick only tells that a frame
        went out in the last half interval, so the tick after one without a change owes
        a heartbeat: the first tick never sends one (half an interval since the sleep
        began, after a frame), and one that sees a change waits another half. So at most
        `idle` without a frame, as with a plain timer, and no heartbeat at all while
        frames go out at least every half interval; the cost is a timer callback per half
        interval, not a task wake-up and a write."""
        if waiter.done():
            return
        now = self._handed_on()
        if seen is None or now != seen:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(idle / 2, self._idle_tick, waiter, idle, now)
            return
        self._idle_timer = None
        waiter.set_result(True)

    def _handed_on(self) -> int:
        """Changes whenever a frame of a watched job's event is written directly: the sum of
        the last seqs handed on, which the direct write moves forward (and nothing else
        moves while the writer sleeps, but a watch, unwatch or reset, which wake it or
        answer with a frame). The all-jobs stream's direct writes are not counted: a
        dashboard gets its heartbeats as before. Read per half interval, not per event."""
        return self.core.handed_on()

    def _wake(self, timed_out: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(timed_out)

    def _woken(self) -> None:
        if self.core.too_slow is not None:
            self._too_slow_now()
            return
        self._wake()

    def _perform(self) -> None:
        """Carry out what the core asked for: let go of the subscriptions of ended jobs."""
        effects = self.core.effects
        if not effects:
            return
        self.core.effects = []
        for effect in effects:
            self._hub.unsubscribe(self._keys.job_channel(effect.job_id), self._job_sink)

    async def _backfill(self, job_id: str) -> None:
        self.core.land()  # (its own position: not a lane's)
        since = self.core.last.get(job_id, 0)
        page = await self._store.events_since(job_id, since, self._principal)
        if self.core.page(job_id, since, page):
            assert page is not None
            await self._reset(job_id, page.epoch)
        self._perform()

    async def _reset(self, job_id: str, epoch: str | None) -> None:
        """The job's history was lost and began again (a Redis restart without persistence):
        tell the client, forget the seqs it had, and read the new history from the start."""
        if self.core.reset(job_id, epoch):  # it had ended in the old history: follow it again
            await self._hub.subscribe(self._keys.job_channel(job_id), self._job_sink)
        page = await self._store.events_since(job_id, 0, self._principal)
        if page is not None:
            self.core.advance(job_id, page)


def _all_channel(keys: Keys, principal: Principal) -> str | None:
    """Where a principal's all-jobs stream comes from; None for single-job tokens."""
    if principal.jobs is not None:
        return None
    if principal.sees_every_tenant:
        return keys.all_channel
    return keys.tenant_channel(principal.tenant) if principal.tenant else None


#: What `watch_many` says of each id it will not watch because no such job exists for the
#: caller; `reply_refused` words the answer.
_UNKNOWN = JobNotFound("")


def reply_refused(refused: dict[str, JobwireError], reply: Callable[[dict[str, Any]], None]) -> None:
    """One error per refused id, except for many unknown ids: those share one reply
    (`job_ids`), so a message of 1,000 unknown ids costs one frame, not 1,000."""
    missing = [j for j, e in refused.items() if e.code == "job_not_found"]
    for job_id, error in refused.items():
        if error.code != "job_not_found":
            reply(error.as_message(job_id=job_id))
        elif len(missing) == 1:
            reply(JobNotFound(job_id, f"no job with id {job_id!r}").as_message(job_id=job_id))
    if len(missing) > 1:
        reply(
            JobwireError("job_not_found", f"no jobs with {len(missing)} of these ids").as_message(
                job_ids=missing
            )
        )
