"""The high-availability fixtures of tests/support.py work: a Redis Cluster with replicas fails
over when a primary is killed, and so does a Sentinel-watched primary and replica."""

from __future__ import annotations

import time

import redis
from redis.sentinel import Sentinel

from tests.support import primaries, redis_cluster, redis_sentinel, wait_cluster_ok, wait_sentinel_failover


def test_cluster_with_replicas_fails_over_when_a_primary_is_killed() -> None:
    with redis_cluster(3, replicas=1, node_timeout_ms=1000) as nodes:
        assert len(nodes) == 6
        assert primaries(nodes) == nodes[:3]  # primaries first, then replicas
        for node in nodes[3:]:
            assert node.client().execute_command("ROLE")[0] == b"slave"
        victim = nodes[0]
        victim.stop()
        started = time.monotonic()
        survivors = [n for n in nodes if n is not victim]
        wait_cluster_ok(survivors, timeout=30)
        print(f"\ncluster failover took {time.monotonic() - started:.2f}s")
        now = primaries(survivors)
        assert len(now) == 3
        assert nodes[3] in now  # the killed primary's own replica took its place
        cluster = redis.RedisCluster(host="127.0.0.1", port=survivors[0].port)
        try:
            for key in ("a", "b", "c", "d", "e", "f"):  # keys on every shard
                cluster.set(key, key)
                assert cluster.get(key) == key.encode()
        finally:
            cluster.close()


def test_sentinel_fails_over_when_the_primary_is_killed() -> None:
    with redis_sentinel() as setup:
        assert setup.current_primary_port() == setup.primary.port
        assert setup.url.count("sentinel://127.0.0.1:") == 3
        killed = setup.kill_primary()
        assert killed is setup.primary and killed.proc is None
        started = time.monotonic()
        new_port = wait_sentinel_failover(setup, killed.port, timeout=30)
        print(f"\nsentinel failover took {time.monotonic() - started:.2f}s")
        assert new_port == setup.replica.port == setup.current_primary_port()
        sentinel = Sentinel([("127.0.0.1", port) for port in setup.sentinel_ports], socket_timeout=2)
        master = sentinel.master_for(setup.master_name, socket_timeout=2)
        try:
            assert master.set("after-failover", "yes")
            assert master.get("after-failover") == b"yes"
        finally:
            master.close()
