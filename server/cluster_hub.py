"""The fan-out on a Redis Cluster: one pub/sub connection per shard, following failovers.

A job's channel carries its hash tag (`jobwire:{<id>}:live`), so it is a shard channel:
the record script SPUBLISHes it on the node that holds the job, and only that node carries
it. `ClusterHub` follows each shard channel with SSUBSCRIBE on the primary owning its slot,
through one `Hub` per primary (each with the hub's reference counting, batching, confirmed
subscriptions and resync after an outage). The all-jobs and tenant channels span every
job, so they stay plain channels, published cluster-wide and followed on one more
connection, to whichever node answers.

Following the cluster
---------------------
The slot map is read (`CLUSTER SLOTS`, from any node that answers: the seeds of
`JOBWIRE_REDIS_URL` first, then every node the cluster has named since) at start, every
`refresh_interval` seconds, and at once when something says it changed:

- a shard's connection is lost (its primary died: until a replica is promoted, the map is
  read again every `settle_interval`);
- a node drops a subscription by itself (it does when the channel's slot moves away, in a
  resharding).

When a slot's primary changes, its channels move, subscribers and all, to the hub of the
new primary (`Hub.release` / `Hub.adopt`); once the new primary confirms them, their
subscribers get a `Resync` and re-read history from their last seq, so nothing is lost.
While a shard is unreachable its subscribers have been told (`Outage`), and `health` says
"degraded": the other shards' jobs flow on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from jobwire.protocol import Keys
from jobwire.redis_clients import CONNECT_TIMEOUT
from jobwire.redis_target import RedisTarget
from jobwire.server.hub import Health, Hub, HubUnavailable, Sink
from jobwire.server.slot_map import SlotMap, moves, split_name

log = logging.getLogger(__name__)


class ClusterHub:
    """`Hub`'s interface over a Redis Cluster (see module docstring)."""

    def __init__(
        self,
        target: RedisTarget,
        keys: Keys,
        *,
        refresh_interval: float = 10.0,
        settle_interval: float = 0.5,
        **hub_options: Any,
    ) -> None:
        self._target, self._keys, self._options = target, keys, hub_options
        self._refresh_interval, self._settle_interval = refresh_interval, settle_interval
        self._map: SlotMap | None = None
        self._shards: dict[str, Hub] = {}  # primary "host:port" -> its shard hub
        self._dropped: set[str] = set()  # channels a node unsubscribed by itself
        self._plain = Hub(self._plain_url, **hub_options)
        self._plain_turn = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Slot maps read that moved channels (for tests and logs).
        self.remaps = 0
        self._retired_coalesced = 0  # `input_coalesced` of shard hubs stopped since
        self._retired_joined = 0  # and their `input_joined`

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Read the slot map and connect. A cluster that cannot be reached yet does not stop
        the server: it keeps asking, and `health` says "down" meanwhile."""
        try:
            await self._refresh()
        except RedisError as exc:
            log.warning(
                "jobwire hub: cannot read the slot map of %s yet (%s); retrying", self._target.describe(), exc
            )
        await self._plain.start()
        self._task = asyncio.create_task(self._follow(), name="jobwire-cluster-map")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        for hub in self._hubs():
            await hub.stop()

    # -- subscribers -------------------------------------------------------------------

    async def subscribe(self, channel: str, sink: Sink) -> None:
        hub = self._route(channel)
        try:
            await hub.subscribe(channel, sink)
        except BaseException:
            # The channel may have moved to another shard while this waited.
            self.unsubscribe(channel, sink)
            raise

    def unsubscribe(self, channel: str, sink: Sink) -> None:
        hub = self._route(channel, strict=False)
        if hub is not None:
            hub.unsubscribe(channel, sink)

    def subscribers(self, channel: str) -> int:
        hub = self._route(channel, strict=False)
        return hub.subscribers(channel) if hub is not None else 0

    def _route(self, channel: str, *, strict: bool = True) -> Any:
        if self._keys.job_id_from_channel(channel) is None:
            return self._plain
        for hub in self._shards.values():  # where it is subscribed now, if anywhere
            if hub.subscribers(channel):
                return hub
        owner = self._map.owner(channel) if self._map is not None else ""
        hub = self._shards.get(owner)
        if hub is None and strict:
            raise HubUnavailable(f"no primary of {self._target.describe()} serves {channel!r} now")
        return hub

    # -- state -------------------------------------------------------------------------

    @property
    def health(self) -> Health:
        ups = [hub.connected for hub in self._hubs()]
        if self._map is None or not any(ups):
            return "down"
        return "ok" if all(ups) and self._map.covered else "degraded"

    @property
    def connected(self) -> bool:
        return self.health == "ok"

    @property
    def reconnects(self) -> int:
        return sum(hub.reconnects for hub in self._hubs())

    @property
    def ping_seconds(self) -> float | None:
        """The slowest shard's last PING round trip; None until every shard has one."""
        pings = [hub.ping_seconds for hub in self._hubs()]
        if not pings or None in pings:
            return None
        return max(p for p in pings if p is not None)

    @property
    def input_coalesced(self) -> int:
        """Events coalesced at the input, by every shard's hub (each coalesces its own
        connection's backlog: see `server.backlog`)."""
        return self._retired_coalesced + sum(hub.input_coalesced for hub in self._hubs())

    @property
    def input_joined(self) -> int:
        """Events every shard's hub fanned out joined in runs (see `server.backlog`)."""
        return self._retired_joined + sum(hub.input_joined for hub in self._hubs())

    @property
    def shards(self) -> int:
        """Shard connections (one per primary), for tests and metrics."""
        return len(self._shards)

    def _hubs(self) -> list[Hub]:
        return [*self._shards.values(), self._plain]

    # -- following the slot map ---------------------------------------------------------

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            settled = self._map is not None and self.health == "ok" and not self._dropped
            wait = self._refresh_interval if settled else self._settle_interval
            timer = loop.call_later(wait, self._changed.set)
            try:
                await self._changed.wait()
            finally:
                timer.cancel()
            self._changed.clear()
            try:
                await self._refresh()
            except RedisError as exc:
                log.debug("jobwire hub: slot map not read: %s", exc)
            except Exception:  # an odd reply must not end the following for good
                log.exception("jobwire hub: the slot map could not be read")

    async def _refresh(self) -> None:
        new = await self._read_map()
        for name in new.primaries - self._shards.keys():
            hub = self._shards[name] = Hub(
                self._target.node_url(*split_name(name)),
                sharded=True,
                on_state=self._changed.set,
                on_dropped=self._on_dropped,
                **self._options,
            )
            await hub.start()  # creates its task, nothing more: no other coroutine runs here
        # From here to the end, no await: routing and moves change together.
        placed = {name: hub.channels() for name, hub in self._shards.items()}
        moving = moves(placed, new)
        for channel, (old, owner) in moving.items():
            taken = self._shards[old].release(channel)
            if taken is not None:
                self._shards[owner].adopt(channel, taken)
        for channel in list(self._dropped):
            hub = self._shards.get(new.owner(channel))
            if hub is None and channel not in moving:
                continue  # its slot has no primary yet: kept for the next map
            if hub is not None and channel not in moving:
                hub.resubscribe(channel)  # dropped, yet its slot stayed here
            self._dropped.discard(channel)
        if moving:
            self.remaps += 1
            log.warning(
                "jobwire hub: the cluster's slot map changed; %d channel(s) followed to their new primary",
                len(moving),
            )
        self._map = new
        gone = [
            name for name, hub in self._shards.items() if name not in new.primaries and not hub.channels()
        ]
        for name in gone:
            hub = self._shards.pop(name)
            self._retired_coalesced += hub.input_coalesced
            self._retired_joined += hub.input_joined
            await hub.stop()

    def _on_dropped(self, channel: str) -> None:
        self._dropped.add(channel)
        self._changed.set()

    async def _read_map(self) -> SlotMap:
        """`CLUSTER SLOTS` from the first node that answers."""
        errors = []
        for host, port in self._ask_order():
            client = Redis(
                host=host,
                port=port,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=CONNECT_TIMEOUT,
                username=self._target.username,
                password=self._target.password,
                ssl=self._target.tls,
                retry=Retry(NoBackoff(), 0),  # the next node is asked instead, at once
            )
            try:
                reply = await client.execute_command("CLUSTER SLOTS")
                return SlotMap.from_cluster_slots(reply, host)
            except (RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
            finally:
                await client.aclose()
        raise RedisConnectionError("no node of the cluster answered (" + "; ".join(errors) + ")")

    def _ask_order(self) -> list[tuple[str, int]]:
        """Known primaries first (they know the map best), then every other node the
        cluster named, then the configured seeds."""
        named = list(self._map.nodes) if self._map is not None else []
        out = dict.fromkeys([*(split_name(n) for n in named), *self._target.nodes])
        return list(out)

    async def _plain_url(self) -> str:
        """Where the plain channels are followed: the primaries in turn, so a connection
        lost to a dead node comes back on another."""
        candidates = sorted(self._map.primaries) if self._map is not None else []
        nodes = [split_name(n) for n in candidates] or list(self._target.nodes)
        self._plain_turn += 1
        return self._target.node_url(*nodes[self._plain_turn % len(nodes)])
