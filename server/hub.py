"""The fan-out: one Redis pub/sub connection per server process, shared by every client.

Subscriptions are reference-counted per channel: a job watched by 500 sockets costs one
Redis subscription, dropped when the last watcher leaves.

Why the bookkeeping is ours and not redis-py's
----------------------------------------------
redis-py's asyncio `PubSub.subscribe()` awaits the send *before* recording the channel,
so "is anyone subscribed?" checks race with concurrent subscribers (broadcaster 0.3.1
loses subscribers this way, and a `while pubsub.subscribed` listener can exit). Here:

- `subscribe()` / `unsubscribe()` change the reference counts synchronously, with no
  await between check and update, so hundreds of concurrent callers cannot interleave.
- One reconciler task sends SUBSCRIBE/UNSUBSCRIBE for the difference between the wanted
  and the sent sets, batching hundreds of channels into one command.
- A subscriber is released only when Redis has *confirmed* a SUBSCRIBE that was sent
  after it arrived (a FIFO of waiters per channel matches confirmations to commands,
  so a stale confirmation of an earlier SUBSCRIBE/UNSUBSCRIBE pair cannot release it
  early). Callers rely on this to read history only once live events are flowing: that
  ordering is what makes "subscribe, then backfill" lose nothing.

Redis outages
-------------
The hub's connection never retries silently (a silent reconnect would resubscribe but
hide the messages lost meanwhile). On any connection error it drops the connection, tells
each live subscriber (`Outage`), reconnects with capped exponential backoff and jitter
(asking `locate` again each time: Sentinel's primary may have changed), resubscribes every
wanted channel, and sends each existing subscriber a `Resync` once its channel is
confirmed again; the subscriber re-reads history from its last seq. New subscribers wait
(up to `subscribe_timeout`) until the hub is connected and then proceed normally.

On a cluster, `ClusterHub` runs one hub per shard and moves channels between them when
the slot map changes (`release` / `adopt`); a hub reports its connection's ups and downs
(`on_state`) and a channel Redis unsubscribed by itself (`on_dropped`: its slot moved).

Slow clients are not the hub's business: sinks must not block (clients buffer in their
own bounded queue, see `server.feed`). A slow *hub* is: when the process falls behind on
its pub/sub input (offered more deliveries than it can make), a read of the connection
brings several events of one channel, and the hub coalesces their progress before the
fan-out (`server.backlog`: transitions and final events always kept, in order; the kept
progress counts what it stands for), so the delay stays bounded instead of growing with
the backlog. What a read keeps of one channel goes out in runs, one write per watcher
(`events.Run`), so the further behind, the less each delivery costs. A read with at most
one event per channel is dispatched as it came, at the usual cost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from jobwire.backoff import backoff
from jobwire.lanes import Lane, Rider, step_of
from jobwire.server.backlog import Event, coalesce, runs
from jobwire.server.events import Coalesced, Delivery, Outage, Resync, Run
from jobwire.server.pubsub_conn import PubSubConnection, open_pubsub

log = logging.getLogger(__name__)

#: A subscriber: told each live event (a `Coalesced` one stands for the progress just
#: before it, see `server.backlog`), and its channel's outages and resyncs.
#: A `Run` is several events of a read for one write (see `server.backlog`). A sink that
#: took an item directly, with nothing waiting, may return its stream core to ride the
#: channel's lane (`jobwire.lanes`); any other returns None.
Sink = Callable[[Delivery | Coalesced | Run | Outage | Resync], Rider | None]
#: Where the hub connects: a URL, or a function that finds one (Sentinel's primary, now).
Address = str | Callable[[], Awaitable[str]]
#: How much of the fan-out Redis serves: all of it, part (some cluster shards), or none.
Health = Literal["ok", "degraded", "down"]

_CHUNK = 500  # channels per SUBSCRIBE/UNSUBSCRIBE command


class Fanout(Protocol):
    """What clients need of a hub: `Hub` on one Redis, `ClusterHub` on a cluster."""

    connected: bool
    reconnects: int
    ping_seconds: float | None
    #: Events dropped at the input, coalesced into a newer one before the fan-out.
    input_coalesced: int
    #: Events fanned out joined with others of their job, for one write per watcher.
    input_joined: int

    @property
    def health(self) -> Health: ...

    async def subscribe(self, channel: str, sink: Sink) -> None: ...
    def unsubscribe(self, channel: str, sink: Sink) -> None: ...
    def subscribers(self, channel: str) -> int: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Moving:
    """A channel on its way from one shard's hub to another's (`Hub.release`, `Hub.adopt`):
    its subscribers, the future they wait on, and whether they are owed a resync."""

    sinks: set[Sink]
    ready: asyncio.Future[None]
    resync: bool


class HubUnavailable(RedisConnectionError):
    """Redis did not confirm a subscription in time (it is down or unreachable): a lost
    connection by another name, handled as one (503, or a websocket closed 1013)."""


class Hub:
    """Reference-counted pub/sub fan-out over one Redis connection (see module docstring)."""

    def __init__(
        self,
        address: Address,
        *,
        # Timeouts
        subscribe_timeout: float = 5.0,
        ping_interval: float = 5.0,
        reconnect_min: float = 0.05,
        reconnect_max: float = 2.0,  # a failover takes seconds: look again soon after
        # Observability
        on_event: Callable[[str], None] | None = None,
        # Shard channels (SSUBSCRIBE) on one node of a Redis Cluster, see `ClusterHub`
        sharded: bool = False,
        on_state: Callable[[], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
        # Channels whose events are no part of an ordered stream (the all-jobs streams)
        unordered: Callable[[str], bool] | None = None,
    ) -> None:
        self._unordered = unordered
        self._on_event = on_event
        self._on_state, self._on_dropped = on_state, on_dropped
        self._address = address
        self._sub, self._unsub = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self._message = b"smessage" if sharded else b"message"
        self._subscribed = b"ssubscribe" if sharded else b"subscribe"
        self._unsubscribed = b"sunsubscribe" if sharded else b"unsubscribe"
        self._subscribe_timeout = subscribe_timeout
        self._ping_interval = ping_interval
        self._reconnect_min, self._reconnect_max = reconnect_min, reconnect_max

        self._sinks: dict[str, Lane] = {}  # per channel: its subscribers (see `jobwire.lanes`)
        self._ready: dict[str, asyncio.Future[None]] = {}  # resolved once Redis confirms
        self._sent: set[str] = set()  # SUBSCRIBE sent on the current connection
        self._waiters: dict[str, deque[asyncio.Future[None] | None]] = {}  # per SUBSCRIBE sent
        self._resync: set[str] = set()  # channels to resync once re-confirmed
        self._unsent: dict[str, int] = {}  # UNSUBSCRIBEs sent and not yet answered, per channel
        self._changed: set[str] = set()  # channels gained or lost since the last sync
        self._dirty = asyncio.Event()
        self._conn: PubSubConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.reconnects = 0
        # Per channel, the last event a coalescing read saw (see `server.backlog`).
        self._previous: dict[str, Delivery] = {}
        self.input_coalesced = 0
        self.input_joined = 0  # events fanned out in a `Run` (one write per watcher in sync)
        self._last_heard = 0.0  # loop time of the last message from Redis
        self._pings: deque[float] = deque()  # loop times of the PINGs not answered yet
        #: Round trip of the last PING answered on the current connection (seconds), or
        #: None: what `/metrics` reports as Redis latency, so a scrape costs Redis nothing.
        self.ping_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobwire-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # wait(), not `await task` in try/except CancelledError: that would also
            # swallow a cancellation of stop() itself.
            await asyncio.wait({self._task})
        self._close_connection()
        for fut in self._ready.values():
            if not fut.done():
                fut.cancel()

    # -- subscribers -------------------------------------------------------------------

    async def subscribe(self, channel: str, sink: Sink) -> None:
        """Add `sink` to `channel`; return once Redis delivers the channel's messages.

        Raises `HubUnavailable` if Redis does not confirm within `subscribe_timeout`
        (the sink is removed again).
        """
        sinks = self._sinks.get(channel)
        if sinks is None:
            sinks = self._sinks[channel] = Lane()
            ready = self._ready[channel] = asyncio.get_running_loop().create_future()
            if channel in self._sent:
                # The last sink left and this one came back before the reconciler sent
                # the UNSUBSCRIBE: the Redis subscription never lapsed, so this sink is
                # live as soon as the pending confirmation (if any) arrives.
                waiters = self._waiters.get(channel)
                if waiters:
                    waiters[-1] = ready
                else:
                    ready.set_result(None)
            else:
                self._changed.add(channel)
                self._dirty.set()
        sinks.add(sink)
        ready = self._ready[channel]
        if ready.done():
            return
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancellation that coincides
            # with the future completing.
            async with asyncio.timeout(self._subscribe_timeout):
                await asyncio.shield(ready)
        except (TimeoutError, asyncio.CancelledError) as exc:
            self.unsubscribe(channel, sink)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise HubUnavailable(
                f"Redis did not confirm the subscription to {channel!r} within {self._subscribe_timeout}s"
            ) from None

    def unsubscribe(self, channel: str, sink: Sink) -> None:
        """Remove `sink`; the Redis subscription goes when its last sink does."""
        sinks = self._sinks.get(channel)
        if sinks is None or sink not in sinks:
            return
        sinks.discard(sink)
        if not sinks:
            del self._sinks[channel]
            self._previous.pop(channel, None)
            ready = self._ready.pop(channel)
            if not ready.done():
                ready.cancel()
            self._resync.discard(channel)
            self._changed.add(channel)
            self._dirty.set()

    def subscribers(self, channel: str) -> int:
        return len(self._sinks.get(channel, ()))

    @property
    def health(self) -> Health:
        return "ok" if self.connected else "down"

    def channels(self) -> list[str]:
        """Every channel with a subscriber."""
        return list(self._sinks)

    def release(self, channel: str) -> Moving | None:
        """Take `channel` away with its subscribers, for `adopt` by another hub (its slot
        moved to another node). Subscribers waiting for confirmation keep waiting, on the
        future handed over, which the adopting hub resolves."""
        lane = self._sinks.pop(channel, None)
        if lane is None:
            return None
        lane.disband()  # in step here; there, each core starts from its own position
        sinks = set(lane)
        self._previous.pop(channel, None)
        ready = self._ready.pop(channel)
        # Live before, or told of an outage and owed a resync: either way they may have
        # missed events, and re-read history once the new node confirms.
        resync = ready.done() or channel in self._resync
        self._resync.discard(channel)
        waiters = self._waiters.get(channel)
        if waiters:  # a confirmation still due here must not release them there
            self._waiters[channel] = deque(None for _ in waiters)
        self._changed.add(channel)
        self._dirty.set()
        return Moving(sinks, ready, resync)

    def resubscribe(self, channel: str) -> None:
        """Subscribe `channel` again here (Redis dropped it, but its slot stayed)."""
        if channel in self._sinks and channel not in self._sent:
            self._changed.add(channel)
            self._dirty.set()

    def adopt(self, channel: str, moving: Moving) -> None:
        """Take over `channel` from another hub (see `release`). Subscribers owed a resync
        get it once the channel is confirmed here."""
        ready = moving.ready
        if ready.done():
            ready = asyncio.get_running_loop().create_future()
        self._sinks.setdefault(channel, Lane()).update(moving.sinks)
        self._ready[channel] = ready
        if moving.resync:
            self._resync.add(channel)
        if channel not in self._sent:
            self._changed.add(channel)
            self._dirty.set()
            return
        # Still subscribed here (it moved away and back before the UNSUBSCRIBE went out):
        # live when the confirmation on its way arrives, or now if none is.
        waiters = self._waiters.get(channel)
        if waiters:
            waiters[-1] = ready
        else:
            self._live(channel, ready)

    # -- the connection ----------------------------------------------------------------

    async def _run(self) -> None:
        delays = backoff(self._reconnect_min, self._reconnect_max)
        while True:
            try:
                url = self._address if isinstance(self._address, str) else await self._address()
                on_error = self._on_error_reply if self._sub == "SSUBSCRIBE" else None
                self._conn = await open_pubsub(
                    url, self._on_reply, on_error=on_error, on_replies=self._on_replies
                )
                self._last_heard = asyncio.get_running_loop().time()
                if self.reconnects:
                    log.warning("jobwire hub: reconnected to Redis")
                self.connected = True
                self._state_changed()
                delays = backoff(self._reconnect_min, self._reconnect_max)
                self._dirty.set()
                await self._serve()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("jobwire hub: lost Redis (%s); reconnecting", exc)
            was_connected, self.connected = self.connected, False
            self.reconnects += 1
            self._close_connection()
            self._forget_connection()
            if was_connected:
                self._state_changed()
            await asyncio.sleep(next(delays))

    def _state_changed(self) -> None:
        if self._on_state is not None:
            self._on_state()

    async def _serve(self) -> None:
        """Keep the subscriptions in sync until the connection ends (or the sync fails)."""
        assert self._conn is not None
        closed = self._conn.closed
        sync = asyncio.create_task(self._sync_loop(self._conn), name="jobwire-hub-sync")
        try:
            await asyncio.wait({sync, closed}, return_when=asyncio.FIRST_COMPLETED)
            if sync.done():
                sync.result()  # re-raise the failure
            closed.result()  # why the connection ended
        finally:
            sync.cancel()
            await asyncio.gather(sync, return_exceptions=True)

    def _forget_connection(self) -> None:
        """After a disconnect nothing is subscribed: re-arm every channel."""
        self._pings.clear()
        self.ping_seconds = None
        self._previous.clear()  # messages in flight were lost: nothing follows these
        self._sent.clear()
        self._waiters.clear()
        self._unsent.clear()
        self._changed.update(self._sinks)
        loop = asyncio.get_running_loop()
        for channel, ready in list(self._ready.items()):
            if ready.done():
                # Its sinks may miss messages: tell them now, and resync them once it is
                # confirmed again; meanwhile new subscribers wait for the new confirmation.
                self._resync.add(channel)
                self._ready[channel] = loop.create_future()
                self._fan_out(channel, Outage(channel))

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _sync_loop(self, conn: PubSubConnection) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE for the difference between wanted and sent, and PING."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time()  # the first PING at once: the latency is known from the start
        while True:
            # A timer sets the event for the next PING. Not wait_for: a task per wait, and
            # on Python 3.11 it can swallow a cancellation (CPython gh-86296).
            timer = loop.call_later(max(0.0, next_ping - loop.time()), self._dirty.set)
            try:
                await self._dirty.wait()
            finally:
                timer.cancel()
            self._dirty.clear()
            if loop.time() >= next_ping:
                # PINGs go out every ping_interval; three unanswered means a dead link.
                if loop.time() - self._last_heard > 3 * self._ping_interval:
                    raise ConnectionError("no reply from Redis to PING")
                conn.send("PING")
                self._pings.append(loop.time())
                next_ping = loop.time() + self._ping_interval
            # Only what changed since the last pass: a job ending costs O(1) here, not a
            # scan of every channel (a thousand jobs ending would be quadratic).
            changed, self._changed = self._changed, set()
            wanted, sent = self._sinks, self._sent
            gone = [ch for ch in changed if ch in sent and ch not in wanted]
            new = [ch for ch in changed if ch in wanted and ch not in sent]
            # A failed send is undone wholesale by _forget_connection().
            self._sent.difference_update(gone)
            for ch in gone:
                self._unsent[ch] = self._unsent.get(ch, 0) + 1
            for ch in new:
                self._sent.add(ch)
                self._waiters.setdefault(ch, deque()).append(self._ready.get(ch))
            # One command per channel when sharded: SSUBSCRIBE takes channels of one slot only.
            chunk = 1 if self._sub == "SSUBSCRIBE" else _CHUNK
            for i in range(0, len(gone), chunk):
                conn.send(self._unsub, *gone[i : i + chunk])
            for i in range(0, len(new), chunk):
                conn.send(self._sub, *new[i : i + chunk])

    def _on_reply(self, reply: list[bytes]) -> None:
        """Every reply on the connection, from its read callback (see `pubsub_conn`)."""
        self._last_heard = asyncio.get_running_loop().time()
        kind = reply[0]
        if kind == self._message:
            self._dispatch(reply[1].decode(), reply[2])
        elif kind == self._subscribed:
            self._confirmed(reply[1].decode())
        elif kind == self._unsubscribed:
            self._unsubscribed_reply(reply[1].decode())
        elif kind == b"pong" or reply == b"PONG":  # PING's reply with, and without, subscriptions
            if self._pings:
                self.ping_seconds = asyncio.get_running_loop().time() - self._pings.popleft()

    def _on_replies(self, replies: list[Any]) -> None:
        """The replies of one read, when there are several (see `pubsub_conn`).

        Events of distinct channels are dispatched one by one, as `_on_reply` does. Several
        events of one channel mean the process is behind on its input: then each run of
        messages (between other replies, which keep their places) is coalesced per channel
        before the fan-out (`server.backlog`)."""
        message = self._message
        channels = [reply[1] for reply in replies if reply[0] == message]
        if len(set(channels)) == len(channels):
            for reply in replies:
                self._on_reply(reply)
            return
        self._last_heard = asyncio.get_running_loop().time()
        batch: list[tuple[str, Event]] = []
        for reply in replies:
            if reply[0] != message:
                self._fan_out_batch(batch)
                batch = []
                self._on_reply(reply)
                continue
            channel = reply[1].decode()
            if channel in self._sinks:
                delivery = self._parse(channel, reply[2])
                if delivery is not None:
                    batch.append((channel, delivery))
        self._fan_out_batch(batch)

    def _fan_out_batch(self, batch: list[tuple[str, Event]]) -> None:
        if not batch:
            return
        kept = coalesce(batch, self._previous)
        self.input_coalesced += len(batch) - len(kept)
        # Joined only where they stay side by side in the read, so a client watching
        # several jobs hears them in the order they were published (a child's final event
        # before its group's count of children done). The all-jobs streams' events are no
        # part of a job's ordered stream (see `Delivery.all_frame`): they go out first and
        # do not part the events of a job that they came between.
        unordered = self._unordered
        if unordered is not None:
            ordered = []
            for channel, item in kept:
                if unordered(channel):
                    self._fan_out(channel, item)
                else:
                    ordered.append((channel, item))
            kept = ordered
        at = 0
        while at < len(kept):
            channel = kept[at][0]
            end = at + 1
            while end < len(kept) and kept[end][0] == channel:
                end += 1
            if end - at == 1:
                self._fan_out(channel, kept[at][1])
            else:
                for piece in runs([item for _, item in kept[at:end]]):
                    if type(piece) is Run:
                        self.input_joined += len(piece.items)
                    self._fan_out(channel, piece)
            at = end

    def _confirmed(self, channel: str) -> None:
        waiters = self._waiters.get(channel)
        ready = waiters.popleft() if waiters else None
        if waiters is not None and not waiters:
            del self._waiters[channel]
        if ready is None or ready.done() or self._ready.get(channel) is not ready:
            return  # confirms a SUBSCRIBE nobody waits for any more
        self._live(channel, ready)

    def _live(self, channel: str, ready: asyncio.Future[None]) -> None:
        """Redis delivers `channel` now: release its waiting subscribers, and resync the
        ones that may have missed events."""
        ready.set_result(None)
        if channel in self._resync:
            self._resync.discard(channel)
            self._fan_out(channel, Resync(channel))

    def _on_error_reply(self, error: str) -> bool:
        """A cluster node answered an SSUBSCRIBE with MOVED (or ASK): the channel's slot is
        elsewhere now. Only that channel is dropped, to be moved (`on_dropped`); any other
        error ends the connection."""
        kind, _, rest = error.partition(" ")
        if kind not in ("MOVED", "ASK") or not rest.split(" ", 1)[0].isdigit():
            return False
        slot = int(rest.split(" ", 1)[0])
        for channel in [ch for ch in self._waiters if key_slot(ch.encode()) == slot]:
            self._waiters.pop(channel)
            self._sent.discard(channel)
            self._dropped(channel)
        return True

    def _dropped(self, channel: str) -> None:
        if self._on_dropped is not None:
            self._on_dropped(channel)
        else:  # no one to move it: subscribe again here
            self._changed.add(channel)
            self._dirty.set()

    def _unsubscribed_reply(self, channel: str) -> None:
        pending = self._unsent.get(channel, 0)
        if pending > 1:
            self._unsent[channel] = pending - 1
        elif pending == 1:
            del self._unsent[channel]
        elif channel in self._sent:
            # Unasked: Redis dropped the subscription itself (a cluster node does when the
            # channel's slot moves away). Its subscribers are told, and wait for a resync.
            self._sent.discard(channel)
            self._waiters.pop(channel, None)
            ready = self._ready.get(channel)
            if ready is not None and ready.done():
                self._resync.add(channel)
                self._ready[channel] = asyncio.get_running_loop().create_future()
                self._fan_out(channel, Outage(channel))
            self._dropped(channel)

    def _dispatch(self, channel: str, data: bytes) -> None:
        if channel not in self._sinks:
            return  # in flight while we unsubscribed
        try:
            delivery = Delivery.parse(data)
        except (ValueError, KeyError, TypeError):
            log.error("jobwire hub: dropping malformed event on %s: %.200r", channel, data)
            return
        if self._on_event is not None:
            self._on_event(delivery.state)
        self._fan_out(channel, delivery)

    def _parse(self, channel: str, data: bytes) -> Delivery | None:
        """`_dispatch`'s parse, for a coalescing read (kept apart: that one is the hot path)."""
        try:
            delivery = Delivery.parse(data)
        except (ValueError, KeyError, TypeError):
            log.error("jobwire hub: dropping malformed event on %s: %.200r", channel, data)
            return None
        if self._on_event is not None:
            self._on_event(delivery.state)
        return delivery

    def _fan_out(self, channel: str, item: Delivery | Coalesced | Run | Outage | Resync) -> None:
        """Hand `item` to the channel's subscribers: a plain event that is the next one of
        the watchers in step goes to them in one loop of writes (`jobwire.lanes`), then to
        every other's sink; a sink that took a plain event directly with nothing waiting
        (it returns its core) comes on board."""
        lane = self._sinks.get(channel)
        if lane is None:
            return
        step = step_of(item)  # what a lane may carry: not a final event, an outage, a resync
        if lane.riders:
            if step is not None and lane.follows(step):
                lane.carry(step)
            else:
                lane.disband()
        for sink in tuple(lane.walkers):
            try:
                rider = sink(item)
                if rider is not None and step is not None:
                    lane.board(sink, rider, step)
            except Exception:
                log.exception("jobwire hub: a subscriber failed on %s", channel)
