"""The fan-out on a Redis Cluster: one pub/sub connection per shard, whatever the watchers.

A job's channel carries its hash tag (`jobwire:{<id>}:live`), so it is a shard channel:
the record script SPUBLISHes it on the node that holds the job, and only that node carries
it. `ClusterHub` follows each shard channel with SSUBSCRIBE on the primary owning its slot,
through one `Hub` per primary (each with the hub's reference counting, batching, confirmed
subscriptions and resync after an outage). The all-jobs and tenant channels span every
job, so they stay plain channels, published cluster-wide and followed on one more
connection.

The slot map is read when the hub starts. A resharding or failover while it runs is not
followed yet: restart the server after one (see README, "Deployment and scale").
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from jobwire.protocol import Keys
from jobwire.server.hub import Hub, Sink


def _node_url(cluster_url: str, host: str, port: int) -> str:
    """The cluster URL pointed at one node, keeping its scheme and credentials."""
    parts = urlsplit(cluster_url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, "", "", ""))


class ClusterHub:
    """`Hub`'s interface over a Redis Cluster (see module docstring)."""

    def __init__(self, cluster_url: str, keys: Keys, **hub_options: object) -> None:
        self._url, self._keys, self._options = cluster_url, keys, hub_options
        self._shards: dict[str, Hub] = {}  # primary "host:port" -> its shard hub
        self._owner: list[Hub] = []  # slot -> the shard hub of its primary
        self._plain: Hub | None = None

    async def start(self) -> None:
        cluster = RedisCluster.from_url(self._url)
        try:
            await cluster.initialize()
            slots = cluster.nodes_manager.slots_cache
            for node in cluster.get_primaries():
                url = _node_url(self._url, node.host, node.port)
                self._shards[node.name] = Hub(url, sharded=True, **self._options)  # type: ignore[arg-type]
            self._owner = [self._shards[slots[slot][0].name] for slot in range(REDIS_CLUSTER_HASH_SLOTS)]
            first = cluster.get_primaries()[0]
            self._plain = Hub(_node_url(self._url, first.host, first.port), **self._options)  # type: ignore[arg-type]
        finally:
            await cluster.aclose()
        for hub in self._hubs():
            await hub.start()

    async def stop(self) -> None:
        for hub in self._hubs():
            await hub.stop()

    def _hubs(self) -> list[Hub]:
        return [*self._shards.values(), *([self._plain] if self._plain else [])]

    def _route(self, channel: str) -> Hub:
        if self._keys.job_id_from_channel(channel) is not None:
            return self._owner[key_slot(channel.encode())]
        assert self._plain is not None
        return self._plain

    async def subscribe(self, channel: str, sink: Sink) -> None:
        await self._route(channel).subscribe(channel, sink)

    def unsubscribe(self, channel: str, sink: Sink) -> None:
        self._route(channel).unsubscribe(channel, sink)

    def subscribers(self, channel: str) -> int:
        return self._route(channel).subscribers(channel)

    @property
    def connected(self) -> bool:
        return bool(self._shards) and all(hub.connected for hub in self._hubs())

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
    def shards(self) -> int:
        """Shard connections (one per primary), for tests and metrics."""
        return len(self._shards)
