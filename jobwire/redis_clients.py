"""redis-py clients for a `RedisTarget`: one place that knows one server, a cluster and
Sentinel apart, so the worker's recorder, the server, its bridge and the CLI all follow a
failover the same way.

- A cluster client is given every seed node: it starts while any of them answers, and
  redis-py re-reads the slot map when a node stops answering or redirects.
- A Sentinel client asks the sentinels for the primary on every new connection, so after
  a failover the next command reaches the new primary (what Celery's own Sentinel backend
  does for the workers).

The server's pub/sub connections are not redis-py's (see `server.pubsub_conn`): for those,
`primary_url` asks Sentinel where the primary is now, and `server.cluster_hub` follows the
cluster's slot map itself.
"""

from __future__ import annotations

import os
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel

from jobwire.redis_target import RedisTarget

#: How long finding a node may take: a dead seed or sentinel should cost a moment, not
#: the operating system's TCP timeout.
CONNECT_TIMEOUT = 2.0
#: How the sentinels themselves are asked: briefly and once each (a dead one is skipped
#: for the next at once, not retried with redis-py's backoff of seconds), and without the
#: primary's password, as Celery's Sentinel backend does.
_SENTINEL_OPTIONS = {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": CONNECT_TIMEOUT}


#: What Redis says while it fails over: no connection (the primary died), the cluster not
#: serving a slot yet (CLUSTERDOWN, TRYAGAIN, a slot missing from the client's map, or
#: redirects that ran out while slots moved: ClusterError), or a write that reached a
#: primary just demoted (READONLY). Retrying later succeeds; none of them means a command
#: was wrong (a cross-slot command is a RedisClusterException of another kind: not here).
_TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    TryAgainError,
    ReadOnlyError,
    SlotNotCoveredError,
)
_REDIS_PACKAGE = os.path.dirname(redis.__file__) + os.sep


def is_transient(exc: BaseException) -> bool:
    """Redis is out of reach or failing over: retry later, it is no fault of the request.

    Also true of an `AttributeError` or `TypeError` raised inside redis-py's own
    connection code: its cluster client can use a connection that a concurrent failure
    has just torn down (`'NoneType' object has no attribute 'writelines'`), which is a
    lost connection by another name.
    """
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, (AttributeError, TypeError)) and exc.__traceback__ is not None:
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        return tb.tb_frame.f_code.co_filename.startswith(_REDIS_PACKAGE)
    return False


def sync_client(target: RedisTarget, **options: Any) -> redis.Redis:
    """A blocking client (the worker's recorder, the CLI)."""
    options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    if target.mode == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        return redis.RedisCluster(startup_nodes=nodes, **_credentials(target), **options)  # type: ignore[return-value]
    if target.mode == "sentinel":
        once = {**_SENTINEL_OPTIONS, "retry": SyncRetry(NoBackoff(), 0)}
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=once)
        return sentinel.master_for(target.master, db=target.db, **_credentials(target), **options)
    return redis.Redis.from_url(target.url, **options)


def async_client(target: RedisTarget, *, max_connections: int, wait: float, **options: Any) -> aredis.Redis:
    """The server's client for reads and small writes. Its pool blocks for up to `wait`
    seconds when all `max_connections` are busy: under a burst (hundreds of sockets
    replaying history at once) requests queue instead of failing with "Too many
    connections"."""
    options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    if target.mode == "cluster":
        nodes = [AsyncClusterNode(host, port) for host, port in target.nodes]
        return _Cluster(  # type: ignore[return-value]
            startup_nodes=nodes, max_connections=max_connections, **_credentials(target), **options
        )
    if target.mode == "sentinel":
        return _sentinel(target).master_for(
            target.master,
            connection_pool_class=_BlockingSentinelPool,
            db=target.db,
            max_connections=max_connections,
            timeout=wait,
            **_credentials(target),
            **options,
        )
    pool = aredis.BlockingConnectionPool.from_url(
        target.url, max_connections=max_connections, timeout=wait, **options
    )
    return aredis.Redis.from_pool(pool)  # owns its pool: aclose() closes its connections too


async def primary_url(target: RedisTarget) -> str:
    """The URL of the Redis to connect to now: Sentinel's current primary, or the target's
    own URL. Raises redis-py's `ConnectionError` (`MasterNotFoundError`) when no sentinel
    names one."""
    if target.mode != "sentinel":
        return target.url
    sentinel = _sentinel(target)
    try:
        host, port = await sentinel.discover_master(target.master)
    finally:
        for client in sentinel.sentinels:
            await client.aclose()
    return target.node_url(host, port)


def _sentinel(target: RedisTarget) -> AsyncSentinel:
    once = {**_SENTINEL_OPTIONS, "retry": AsyncRetry(NoBackoff(), 0)}
    return AsyncSentinel(list(target.nodes), sentinel_kwargs=once)


def _credentials(target: RedisTarget) -> dict[str, Any]:
    creds: dict[str, Any] = {}
    if target.username:
        creds["username"] = target.username
    if target.password is not None:
        creds["password"] = target.password
    if target.tls:
        creds["ssl"] = True
    return creds


class _BlockingSentinelPool(SentinelConnectionPool, aredis.BlockingConnectionPool):
    """Sentinel's pool (connections to whichever server is primary now) that waits for a
    free connection, as the one-server pool does."""


class _Cluster(aredis.RedisCluster):
    """redis-py's asyncio cluster client, retrying a command its own race stopped.

    redis-py 8.1 can hand a command a connection that another command has just torn down:
    the send fails with `AttributeError: 'NoneType' object has no attribute 'writelines'`
    (seen with tens of concurrent commands on a fresh client, and in failovers). Nothing
    was written then, so sending the command again is safe; other errors are redis-py's
    own to retry, and reach the caller as they are.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, _RACE_TRIES + 1):
            try:
                return await super().execute_command(*args, **kwargs)
            except (AttributeError, TypeError) as exc:
                if attempt == _RACE_TRIES or not is_transient(exc):
                    raise


_RACE_TRIES = 3
