"""A Redis Cluster's slot map, and which shard channels must move when it changes.

Pure rules, no I/O: `ClusterHub` reads `CLUSTER SLOTS` from any node that answers and
hands the reply here. Nodes are named "host:port", as the cluster itself names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot


@dataclass(frozen=True)
class SlotMap:
    """Which primary serves each slot ("" where none does), and every node the cluster
    named (primaries first): where to ask for the map next time, when seeds are gone."""

    owners: tuple[str, ...]
    nodes: tuple[str, ...]

    @classmethod
    def from_cluster_slots(cls, reply: Iterable[Any], asked_host: str) -> SlotMap:
        """From a `CLUSTER SLOTS` reply: `[start, end, [host, port, id…], replicas…]` per
        range. An empty host means the node that was asked (Redis's "same as you")."""
        owners = [""] * REDIS_CLUSTER_HASH_SLOTS
        primaries: dict[str, None] = {}
        replicas: dict[str, None] = {}
        for entry in reply:
            start, end, primary, *others = entry
            name = _name(primary, asked_host)
            primaries[name] = None
            for slot in range(int(start), int(end) + 1):
                owners[slot] = name
            for replica in others:
                replicas[_name(replica, asked_host)] = None
        nodes = list(primaries) + [n for n in replicas if n not in primaries]
        return cls(tuple(owners), tuple(nodes))

    @property
    def primaries(self) -> set[str]:
        return {owner for owner in self.owners if owner}

    @property
    def covered(self) -> bool:
        """Every slot has a primary (`cluster_state:ok`, as far as this map says)."""
        return all(self.owners)

    def owner(self, channel: str) -> str:
        """The primary that carries a shard channel ("" while its slot has none)."""
        return self.owners[key_slot(channel.encode())]


def moves(placed: Mapping[str, Iterable[str]], new: SlotMap) -> dict[str, tuple[str, str]]:
    """The channels to move, as channel -> (from node, to node), given where each node's
    channels are subscribed now. A channel whose slot has no primary stays put: it moves
    once one is promoted."""
    out: dict[str, tuple[str, str]] = {}
    for node, channels in placed.items():
        for channel in channels:
            owner = new.owner(channel)
            if owner and owner != node:
                out[channel] = (node, owner)
    return out


def split_name(name: str) -> tuple[str, int]:
    host, _, port = name.rpartition(":")
    return host, int(port)


def _name(node: Any, asked_host: str) -> str:
    host, port = node[0], node[1]
    if isinstance(host, bytes):
        host = host.decode()
    if not host or host == "?":
        host = asked_host
    return f"{host}:{int(port)}"
