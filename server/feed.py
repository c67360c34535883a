"""One client's stream of events: ordered, gap-free and duplicate-free per job.

Every transport (websocket, single-job websocket, SSE) reads from a `Feed`, so the rules
below hold the same way for all of them.

Subscribe without loss: the feed subscribes on the hub first and waits for Redis to
confirm, *then* reads the job's history after `since`, then forwards live events. An event
published between the two is both in history and in the live queue; per-job `seq`
tracking drops the second copy. A live event whose seq jumps ahead (a gap) triggers a
history read from the last seq delivered, so the client never skips one.

Slow clients: live events wait in a bounded inbox. A client that falls `queue_limit`
events behind has its inbox dropped and its jobs resynced from history: it loses no
event and cannot make the server hold unbounded memory. (Coalescing progress for slow
clients is a refinement of this point.) The all-jobs stream has no per-job history to
replay, so there the client is told `{"type": "resync"}` and refetches the listing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from jobwire.protocol import JobNotFound, JobwireError, Keys, Msg
from jobwire.server.auth import Principal
from jobwire.server.events import Delivery, FromAll, Resync
from jobwire.server.hub import Hub
from jobwire.server.store import JobStore, Stream

#: What a feed yields: a watched job's event, an all-jobs-stream event, or a control
#: message (a dict sent as JSON).
Item = Delivery | FromAll | dict[str, Any]


class Feed:
    """The events of the jobs one client watches (see module docstring)."""

    def __init__(
        self, hub: Hub, store: JobStore, keys: Keys, principal: Principal, *, queue_limit: int, max_jobs: int
    ) -> None:
        self._hub, self._store, self._keys, self._principal = hub, store, keys, principal
        self._queue_limit, self._max_jobs = queue_limit, max_jobs
        self._inbox: deque[tuple[bool, Delivery | Resync]] = deque()
        self._out: deque[Item] = deque()
        self._wake = asyncio.Event()
        self._last: dict[str, int] = {}  # watched job -> last seq delivered
        self._epoch: dict[str, str | None] = {}  # watched job -> the epoch `_last` counts in
        self._live: set[str] = set()  # watched jobs with a hub subscription (not final yet)
        self._all_last: dict[str, int] = {}  # all-jobs stream: unfinished job -> last seq
        self._all = False
        self.closing = False
        self._all_channel = _all_channel(keys, principal)
        self._overflowed = False

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
        if job_id in self._last:
            return True
        if len(self._last) >= self._max_jobs:
            raise JobwireError("too_many_jobs", f"a connection may watch at most {self._max_jobs} jobs")
        self._last[job_id] = since
        self._live.add(job_id)
        try:
            await self._hub.subscribe(self._keys.job_channel(job_id), self._job_sink)
            stream = await self._store.events_since(job_id, since, self._principal)
            if stream is not None and (stream.seq < since or (epoch is not None and epoch != stream.epoch)):
                stream = await self._reset(job_id, stream.epoch)
        except BaseException:
            self.unwatch(job_id)
            raise
        if stream is None:
            self.unwatch(job_id)
            return False
        self._epoch[job_id] = stream.epoch
        self._advance(job_id, stream.events)
        self._out.append({"type": Msg.SUBSCRIBED, "job_id": job_id, "seq": self._last[job_id]})
        self._wake.set()
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
            try:
                epoch = (epochs or {}).get(job_id)
                if job_id not in visible or not await self.watch(job_id, since.get(job_id, 0), epoch):
                    refused[job_id] = JobNotFound(job_id, f"no job with id {job_id!r}")
            except JobwireError as exc:
                refused[job_id] = exc
        return refused

    def unwatch(self, job_id: str) -> None:
        self._last.pop(job_id, None)
        self._epoch.pop(job_id, None)
        if job_id in self._live:
            self._live.discard(job_id)
            self._hub.unsubscribe(self._keys.job_channel(job_id), self._job_sink)

    async def watch_all(self) -> None:
        """Also deliver the live events of every job the principal may see (dashboards):
        all jobs for an admin, the tenant's for anyone else."""
        if self._all_channel is None:
            raise JobwireError("forbidden", "this token may watch its own job only")
        if not self._all:
            self._all = True
            try:
                await self._hub.subscribe(self._all_channel, self._all_sink)
            except BaseException:
                self._all = False
                raise

    def unwatch_all(self) -> None:
        if self._all:
            self._all = False
            self._all_last.clear()
            assert self._all_channel is not None
            self._hub.unsubscribe(self._all_channel, self._all_sink)

    def post(self, message: dict[str, Any]) -> None:
        """Queue a control message (a reply to the client) in order with the events."""
        self._out.append(message)
        self._wake.set()

    @property
    def exhausted(self) -> bool:
        """Nothing is queued and nothing more can arrive: every watched job has ended and
        the all-jobs stream is off (or the server is going away). A stream that only
        sends keepalives from here on should end."""
        return self.closing or not (self._live or self._all or self._out or self._inbox or self._overflowed)

    def shutdown(self) -> None:
        """The server is going away: end the stream now; the client reconnects and resumes."""
        self.closing = True
        self.close()
        self._wake.set()

    def close(self) -> None:
        for job_id in list(self._last):
            self.unwatch(job_id)
        self.unwatch_all()

    # -- what the client receives --------------------------------------------------------

    async def next(self, idle: float | None = None) -> Item | None:
        """The next event or control message for the client, waiting if there is none.

        Returns None after `idle` seconds with nothing to send (time for a heartbeat).
        Only that idle wait is timed out, never a history read in flight, so no event
        can be lost to the timeout.
        """
        while True:
            if self._out:
                return self._out.popleft()
            if self._overflowed:
                self._overflowed = False
                await self._resync_everything()
            elif self._inbox:
                from_all, item = self._inbox.popleft()
                await self._handle(from_all, item)
            else:
                if await self._sleep(idle):
                    return None

    def next_nowait(self) -> Item | None:
        """The next item if it is ready without reading Redis, else None.

        Lets a writer drain a burst without a task and a wait per event; anything that
        needs history (a gap, a resync) is left for `next()`.
        """
        while True:
            if self._out:
                return self._out.popleft()
            if self._overflowed or not self._inbox:
                return None
            from_all, item = self._inbox[0]
            if not self._handle_now(from_all, item):
                return None
            self._inbox.popleft()

    # -- internals -----------------------------------------------------------------------

    async def _sleep(self, idle: float | None) -> bool:
        """Wait for something to do; True if `idle` seconds passed with nothing.

        A timer that sets the wake event, rather than `wait_for`: that costs a task per
        wait (per event, at fan-out rates), and on Python 3.11 it can swallow a
        cancellation that coincides with the event being set, which hangs shutdown.
        """
        self._wake.clear()
        timer = asyncio.get_running_loop().call_later(idle, self._wake.set) if idle else None
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()
        return not (self._out or self._inbox or self._overflowed)

    def _job_sink(self, item: Delivery | Resync) -> None:
        self._push(False, item)

    def _all_sink(self, item: Delivery | Resync) -> None:
        self._push(True, item)

    def _push(self, from_all: bool, item: Delivery | Resync) -> None:
        if len(self._inbox) >= self._queue_limit:
            self._inbox.clear()
            self._overflowed = True
        else:
            self._inbox.append((from_all, item))
        self._wake.set()

    async def _handle(self, from_all: bool, item: Delivery | Resync) -> None:
        if self._handle_now(from_all, item):
            return
        if isinstance(item, Resync):
            job_id = self._keys.job_id_from_channel(item.channel)
            if job_id is not None:
                await self._backfill(job_id)
        else:
            await self._backfill(item.job_id)

    def _handle_now(self, from_all: bool, item: Delivery | Resync) -> bool:
        """Handle an inbox item that needs no Redis read; False if it needs a backfill."""
        if isinstance(item, Resync):
            if from_all:
                self._all_last.clear()
                self._out.append({"type": Msg.RESYNC, "scope": "all"})
                return True
            return self._keys.job_id_from_channel(item.channel) not in self._live
        job_id = item.job_id
        if from_all:
            if job_id in self._last or item.seq <= self._all_last.get(job_id, 0):
                return True  # watched jobs arrive on their own channel, in order
            if item.final:
                self._all_last.pop(job_id, None)
            else:
                self._all_last[job_id] = item.seq
            self._out.append(FromAll(item))
            return True
        last = self._last.get(job_id)
        if last is None:
            return True  # not watched any more
        if item.epoch != self._epoch.get(job_id):
            return False  # the job's history began again: a backfill resets the client
        if item.seq <= last:
            return True  # already delivered from history
        if item.seq == last + 1:
            self._emit(item)
            return True
        return False  # a gap: read history from `last`

    async def _backfill(self, job_id: str) -> None:
        last = self._last.get(job_id)
        if last is None:
            return
        stream = await self._store.events_since(job_id, last, self._principal)
        if stream is None:
            return  # gone (its record lost and not written again yet): the next event resets
        if stream.epoch != self._epoch.get(job_id) or stream.seq < last:
            stream = await self._reset(job_id, stream.epoch)
            if stream is None:
                return
        self._advance(job_id, stream.events)

    async def _reset(self, job_id: str, epoch: str | None) -> Stream | None:
        """The job's history was lost and began again (a Redis restart without persistence):
        tell the client, forget the seqs it had, and read the new history from the start."""
        self._last[job_id] = 0
        self._epoch[job_id] = epoch
        self._out.append({"type": Msg.RESET, "job_id": job_id, "epoch": epoch})
        if job_id not in self._live:  # it had ended in the old history: follow it again
            self._live.add(job_id)
            await self._hub.subscribe(self._keys.job_channel(job_id), self._job_sink)
        return await self._store.events_since(job_id, 0, self._principal)

    def _advance(self, job_id: str, history: list[Delivery]) -> None:
        """Emit the events of `history` the client has not had yet."""
        for event in history:
            last = self._last.get(job_id)
            if last is None:
                return  # unwatched meanwhile
            if event.seq > last + 1:
                # History is authoritative: a gap there means events trimmed by the
                # history limit. Say so rather than let the client guess.
                self._out.append({"type": Msg.GAP, "job_id": job_id, "from": last + 1, "to": event.seq - 1})
            if event.seq > last:
                self._emit(event)

    def _emit(self, event: Delivery) -> None:
        self._last[event.job_id] = event.seq
        self._out.append(event)
        if event.final and event.job_id in self._live:
            # Nothing follows a final event: free the subscription, keep the seq so that
            # a late duplicate is still recognised.
            self._live.discard(event.job_id)
            self._hub.unsubscribe(self._keys.job_channel(event.job_id), self._job_sink)

    async def _resync_everything(self) -> None:
        for job_id in list(self._live):
            await self._backfill(job_id)
        if self._all:
            self._all_last.clear()
            self._out.append({"type": Msg.RESYNC, "scope": "all"})


def _all_channel(keys: Keys, principal: Principal) -> str | None:
    """Where a principal's all-jobs stream comes from; None for single-job tokens."""
    if principal.jobs is not None:
        return None
    if principal.admin:
        return keys.all_channel
    return keys.tenant_channel(principal.tenant) if principal.tenant else None


def reply_refused(refused: dict[str, JobwireError], reply: Callable[[dict[str, Any]], None]) -> None:
    """One error per refused id, except for many unknown ids: those share one reply
    (`job_ids`), so a message of 1,000 unknown ids costs one frame, not 1,000."""
    missing = [j for j, e in refused.items() if e.code == "job_not_found"]
    for job_id, error in refused.items():
        if error.code != "job_not_found" or len(missing) == 1:
            reply(error.as_message(job_id=job_id))
    if len(missing) > 1:
        reply(
            JobwireError("job_not_found", f"no jobs with {len(missing)} of these ids").as_message(
                job_ids=missing
            )
        )
