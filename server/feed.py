"""One client's stream of events: ordered, gap-free and duplicate-free per job.

Every transport (websocket, single-job websocket, SSE) reads from a `Feed`, so the rules
below hold the same way for all of them.

Subscribe without loss: the feed subscribes on the hub first and waits for Redis to
confirm, *then* reads the job's history after `since`, then forwards live events. An event
published between the two is both in history and in the live queue; per-job `seq`
tracking drops the second copy. A live event whose seq jumps ahead (a gap) triggers a
history read from the last seq delivered, so the client never skips one.

Slow clients get every transition and the newest progress. Events wait in the client's
queue until its socket takes them; a progress event still waiting there is replaced by a
newer one of the same job and state (coalesced), so a slow client's queue holds about one
event per job plus its transitions, and the event sent says how many it replaced. Events
that need a history read (a gap, a resync) wait in a bounded inbox; a client that falls
`queue_limit` of those behind has them dropped and its jobs resynced from history, which
keeps every transition (see `scripts/record.lua`). The all-jobs stream has no per-job
history to replay, so there the client is told `{"type": "resync"}` and refetches the
listing.

A client whose queue passes `max_bytes` as live events arrive, or whose socket accepts
nothing for a while (see `StallWatch`), is `too_slow`: its transport closes it (1013) and
it resumes by seq. (A history replay may pass the limit for a moment: it is bounded by the
history's own size, and checking it there would refuse a client its own backlog.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from jobwire.protocol import JobNotFound, JobwireError, Keys, Msg
from jobwire.server.auth import Principal
from jobwire.server.events import Coalesced, Delivery, FromAll, Outage, Resync
from jobwire.server.hub import Fanout
from jobwire.server.store import JobStore, Stream

#: What a feed yields: a watched job's event, an all-jobs-stream event, either of those
#: standing in for coalesced ones, or a control message (a dict sent as JSON).
Item = Delivery | FromAll | Coalesced | dict[str, Any]

_CONTROL_BYTES = 64  # what a queued control message is counted as
_NONE: Any = ()  # an empty queue not made yet (see `Feed.__init__`)


class _Slot:
    """A non-final event waiting in a client's queue. A newer event of the same job and
    state takes its place (and `skipped` counts the ones it replaced), so a client that
    cannot keep up gets the newest progress, not a backlog."""

    __slots__ = ("delivery", "skipped", "from_all")

    def __init__(self, delivery: Delivery, skipped: int, from_all: bool) -> None:
        self.delivery, self.skipped, self.from_all = delivery, skipped, from_all


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
        self._queue_limit, self._max_jobs, self._max_bytes = queue_limit, max_jobs, max_bytes
        # Queues made on first use: most connections never queue (their events are written
        # directly, see `server.direct`), and an empty deque is ~600 bytes.
        self._inbox: deque[tuple[bool, Delivery | Outage | Resync]] = _NONE
        self._out: deque[Item | _Slot] = _NONE
        self._merge: dict[str, _Slot] = {}  # job -> its event waiting in _out, if replaceable
        self._merge_all: dict[str, _Slot] = {}  # the same for the all-jobs stream
        self._out_bytes = self._inbox_bytes = 0
        self.too_slow: str | None = None  # why the client must be closed, once it must
        self.on_too_slow: Callable[[str], None] | None = None  # the transport's, to close it
        self.sending_since: float | None = None  # set by the transport while a send is blocked
        # The transport's: since when its keepalive ping waits for a pong (see StallWatch)
        self.ping_since: Callable[[], float | None] | None = None
        # The transport's direct write of a ready-made frame (see `server.direct`), used
        # only when nothing waits in the queue or is being sent, so the order holds.
        self.write_now: Callable[[bytes, int], bool] | None = None
        self.write_finals = True  # False: a final event goes through the queue (to close after it)
        # Set while the writer sleeps: a future per sleep, not an asyncio.Event per feed,
        # because an idle connection should cost as little as possible.
        self._waiter: asyncio.Future[bool] | None = None  # its result: the idle timer fired
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
        self._advance(job_id, stream)
        self.post({"type": Msg.SUBSCRIBED, "job_id": job_id, "seq": self._last[job_id]})
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
        self._queue(message, _CONTROL_BYTES)
        self._wake()

    def mark_too_slow(self, reason: str) -> None:
        """The client cannot keep up: stop queueing for it; its transport closes it (1013)."""
        if self.too_slow is None:
            self.too_slow = reason
            self.closing = True  # the stream ends without `end`: the client resumes
            self._wake()
            self.close()
            self._out = self._inbox = _NONE
            self._merge.clear()
            self._merge_all.clear()
            self._out_bytes = self._inbox_bytes = 0
            if self.on_too_slow is not None:
                self.on_too_slow(reason)

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
        self._wake()

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
                return self._pop()
            if self._overflowed:
                self._overflowed = False
                await self._resync_everything()
            elif self._inbox:
                from_all, item = self._unqueue_inbox()
                await self._handle(from_all, item)
            elif await self._sleep(idle) or self.exhausted:
                return None  # idle (time for a heartbeat), or nothing more will come

    def next_nowait(self) -> Item | None:
        """The next item if it is ready without reading Redis, else None.

        Lets a writer drain a burst without a task and a wait per event; anything that
        needs history (a gap, a resync) is left for `next()`.
        """
        while True:
            if self._out:
                return self._pop()
            if self._overflowed or not self._inbox:
                return None
            from_all, item = self._inbox[0]
            if not self._handle_now(from_all, item):
                return None
            self._unqueue_inbox()

    def next_queued_event(self) -> Item | None:
        """The next queued item if it is an event, else None: for joining events into one
        write. It never handles the inbox, so nothing is written directly meanwhile, while
        the transport holds events it has taken but not sent."""
        if self._out and type(self._out[0]) is not dict:
            return self._pop()
        return None

    @property
    def queued_bytes(self) -> int:
        """What waits for this client, in bytes (events as sent, control messages as 64)."""
        return self._out_bytes + self._inbox_bytes

    # -- internals -----------------------------------------------------------------------

    async def _sleep(self, idle: float | None) -> bool:
        """Wait for something to do; True if `idle` seconds passed with nothing.

        A timer that wakes the waiter, rather than `wait_for`: that costs a task per
        wait (per event, at fan-out rates), and on Python 3.11 it can swallow a
        cancellation that coincides with the waiter completing, which hangs shutdown.
        """
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(idle, self._wake, True) if idle else None
        try:
            timed_out = await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return timed_out and not (self._out or self._inbox or self._overflowed)

    def _wake(self, timed_out: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(timed_out)

    def _job_sink(self, item: Delivery | Outage | Resync) -> None:
        # The common case inline, since it runs once per event and watcher: the next
        # progress event of a watched job, nothing waiting, and the socket takes it now.
        # (The same decisions as `_push` → `_handle_now` → `_enqueue_event`, spelled out.)
        if (
            type(item) is Delivery
            and self.write_now is not None
            and not (self._out or self._inbox or self._overflowed or item.final)
            and self.sending_since is None
            and self.too_slow is None
        ):
            job_id = item.job_id
            last = self._last.get(job_id)
            if (
                last is not None
                and item.seq == last + 1
                and item.epoch == self._epoch.get(job_id)
                and self.write_now(item.ws_frame, 1)
            ):
                self._last[job_id] = item.seq
                return
        self._push(False, item)

    def _all_sink(self, item: Delivery | Outage | Resync) -> None:
        self._push(True, item)

    def _push(self, from_all: bool, item: Delivery | Outage | Resync) -> None:
        """A live item from the hub. Handled at once when it needs no Redis read and
        nothing waits before it (so the queue can coalesce it); else it waits in the inbox."""
        if self.too_slow is not None:
            return
        if not self._inbox and not self._overflowed and self._handle_now(from_all, item):
            pass
        elif len(self._inbox) >= self._queue_limit:
            self._inbox = _NONE
            self._inbox_bytes = 0
            self._overflowed = True
        else:
            if not self._inbox:
                self._inbox = deque()
            self._inbox.append((from_all, item))
            if isinstance(item, Delivery):
                self._inbox_bytes += len(item.raw)
        if self._out_bytes + self._inbox_bytes > self._max_bytes:
            self.mark_too_slow(f"client too slow: over {self._max_bytes} bytes queued; resume by seq")
        elif self._out or self._inbox or self._overflowed:  # not when it was written directly
            self._wake()

    def _unqueue_inbox(self) -> tuple[bool, Delivery | Outage | Resync]:
        from_all, item = self._inbox.popleft()
        if isinstance(item, Delivery):
            self._inbox_bytes -= len(item.raw)
        return from_all, item

    def _queue(self, item: Item | _Slot, size: int) -> None:
        if not self._out:
            self._out = deque()
        self._out.append(item)
        self._out_bytes += size

    def _pop(self) -> Item:
        item = self._out.popleft()
        if type(item) is _Slot:
            delivery = item.delivery
            merge = self._merge_all if item.from_all else self._merge
            if merge.get(delivery.job_id) is item:
                del merge[delivery.job_id]
            self._out_bytes -= len(delivery.raw)
            if item.skipped:
                return Coalesced(delivery, item.skipped, item.from_all)
            return FromAll(delivery) if item.from_all else delivery
        if isinstance(item, Delivery):
            self._out_bytes -= len(item.raw)
        elif isinstance(item, (FromAll, Coalesced)):
            self._out_bytes -= len(item.delivery.raw)
        else:
            self._out_bytes -= _CONTROL_BYTES
        return item

    def _enqueue_event(self, event: Delivery, skipped: int, from_all: bool) -> None:
        """Queue `event`, in place of the job's waiting event when that one is replaceable:
        same state and epoch, not final (see `_Slot`)."""
        if (
            self.write_now is not None
            and not self._out
            and self.sending_since is None
            and not skipped
            and (self.write_finals or not event.final)
            and self.write_now(event.all_ws_frame if from_all else event.ws_frame, 1)
        ):
            return
        merge = self._merge_all if from_all else self._merge
        job_id = event.job_id
        slot = merge.get(job_id)
        if slot is not None and slot.delivery.state == event.state and slot.delivery.epoch == event.epoch:
            if event.final:
                del merge[job_id]  # a final event is never replaced: it gets its own place
            else:
                self._out_bytes += len(event.raw) - len(slot.delivery.raw)
                slot.skipped += 1 + skipped
                slot.delivery = event
                return
        if event.final:
            merge.pop(job_id, None)
            if skipped:
                self._queue(Coalesced(event, skipped, from_all), len(event.raw))
            else:
                self._queue(FromAll(event) if from_all else event, len(event.raw))
            return
        slot = merge[job_id] = _Slot(event, skipped, from_all)
        self._queue(slot, len(event.raw))

    async def _handle(self, from_all: bool, item: Delivery | Outage | Resync) -> None:
        if self._handle_now(from_all, item):
            return
        if isinstance(item, Resync):
            job_id = self._keys.job_id_from_channel(item.channel)
            if job_id is not None:
                await self._backfill(job_id)
        else:
            await self._backfill(item.job_id)

    def _handle_now(self, from_all: bool, item: Delivery | Outage | Resync) -> bool:
        """Handle an inbox item that needs no Redis read; False if it needs a backfill."""
        if isinstance(item, Outage):
            self._tell_outage(from_all, item.channel)
            return True
        if isinstance(item, Resync):
            if from_all:
                self._all_last.clear()
                self._merge_all.clear()
                self.post({"type": Msg.RESYNC, "scope": "all"})
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
            self._enqueue_event(item, 0, True)
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

    def _tell_outage(self, from_all: bool, channel: str) -> None:
        """Never silent: the client hears that these events pause, and that they resume
        by themselves (a resync follows once Redis is back)."""
        if from_all:
            self.post(_OUTAGE.as_message(scope="all"))
            return
        job_id = self._keys.job_id_from_channel(channel)
        if job_id is not None and job_id in self._live:
            self.post(_OUTAGE.as_message(job_id=job_id))

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
        self._advance(job_id, stream)

    async def _reset(self, job_id: str, epoch: str | None) -> Stream | None:
        """The job's history was lost and began again (a Redis restart without persistence):
        tell the client, forget the seqs it had, and read the new history from the start."""
        self._last[job_id] = 0
        self._epoch[job_id] = epoch
        self._merge.pop(job_id, None)
        self.post({"type": Msg.RESET, "job_id": job_id, "epoch": epoch})
        if job_id not in self._live:  # it had ended in the old history: follow it again
            self._live.add(job_id)
            await self._hub.subscribe(self._keys.job_channel(job_id), self._job_sink)
        return await self._store.events_since(job_id, 0, self._principal)

    def _advance(self, job_id: str, stream: Stream) -> None:
        """Emit the events of `stream` the client has not had yet.

        History is authoritative, and a seq missing from it was trimmed: progress (the
        next event says how many it stands for, `coalesced`), or, past `history_max`,
        anything (then a `gap` message says which seqs were lost).
        """
        for event in stream.events:
            last = self._last.get(job_id)
            if last is None:
                return  # unwatched meanwhile
            if event.seq <= last:
                continue
            skipped = event.seq - last - 1
            if skipped and stream.lost > last:
                self._merge.pop(job_id, None)
                self.post({"type": Msg.GAP, "job_id": job_id, "from": last + 1, "to": event.seq - 1})
                skipped = 0
            self._emit(event, skipped)

    def _emit(self, event: Delivery, skipped: int = 0) -> None:
        self._last[event.job_id] = event.seq
        self._enqueue_event(event, skipped, False)
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
            self._merge_all.clear()
            self.post({"type": Msg.RESYNC, "scope": "all"})


def _all_channel(keys: Keys, principal: Principal) -> str | None:
    """Where a principal's all-jobs stream comes from; None for single-job tokens."""
    if principal.jobs is not None:
        return None
    if principal.admin:
        return keys.all_channel
    return keys.tenant_channel(principal.tenant) if principal.tenant else None


#: What a client hears when the Redis that carries its job's events is out of reach.
_OUTAGE = JobwireError(
    "unavailable",
    "lost the connection to Redis for these events; they resume here, with nothing missed, once it is back",
)

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
