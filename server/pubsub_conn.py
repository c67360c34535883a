"""The hub's Redis pub/sub connection: an asyncio protocol that parses with hiredis and
hands each reply to the hub from the read callback itself.

Why not redis-py's `PubSub`: there, every message costs a wake of the reading task, a
stream read, a future, a message dict and redis-py's observability hooks; at a thousand
events a second that was a real share of a delivery's cost. Here the messages that came
in one read are parsed and dispatched in one callback, with no task in between.

A read that brings several replies goes to `on_replies` as one batch: a read holds
everything that arrived since the last one, so it is where a process that falls behind on
its input sees the backlog (the hub coalesces it, see `server.backlog`). A read of one
reply, the usual case, costs no list.

The connection only ever carries (S)SUBSCRIBE, (S)UNSUBSCRIBE and PING (and AUTH first),
all of whose replies arrive as pub/sub messages in RESP2, so it needs nothing more.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import AuthenticationError, ConnectionError, RedisError, ResponseError

Reply = Callable[[Any], None]
#: Told the replies of one read, when there are several (and none is an error).
Replies = Callable[[list[Any]], None]
#: Told an error reply; True if it is handled (the connection goes on), False to end it.
ErrorReply = Callable[[str], bool]


class PubSubConnection(asyncio.Protocol):
    """One connection; `closed` completes (with the reason) when it ends, whichever side
    ended it. Replies go to `on_reply` (several of one read to `on_replies`, if given); an
    error reply ends the connection, unless `on_error` handles it."""

    def __init__(
        self, on_reply: Reply, on_error: ErrorReply | None = None, on_replies: Replies | None = None
    ) -> None:
        self._on_reply, self._on_error, self._on_replies = on_reply, on_error, on_replies
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            reply = reader.gets()
            if reply is False:
                return
            more = reader.gets()
            if more is False:  # one reply in this read: the usual case, and no list
                if isinstance(reply, hiredis.ReplyError):
                    self._take(reply)
                else:
                    self._on_reply(reply)
                return
            batch = [reply, more]
            while (reply := reader.gets()) is not False:
                batch.append(reply)
            on_replies = self._on_replies
            if on_replies is None or any(isinstance(r, hiredis.ReplyError) for r in batch):
                for reply in batch:  # (an error is rare: a cluster node's MOVED)
                    self._take(reply)
            else:
                on_replies(batch)
        except RedisError as exc:  # an error reply
            self._end(exc)
        except Exception as exc:  # garbage on the wire (hiredis.ProtocolError), a failing handler
            self._end(ConnectionError(f"pub/sub connection failed: {exc!r}"))

    def _take(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            if self._on_error is None or not self._on_error(str(reply)):
                raise ResponseError(str(reply))
            return
        self._on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ConnectionError(f"Redis closed the pub/sub connection ({exc or 'EOF'})"))

    # -- use --------------------------------------------------------------------------------

    def send(self, *args: str) -> None:
        """Write one command (never blocks: the transport buffers)."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("the pub/sub connection is closed")
        self._transport.write(_encode(args))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._end(ConnectionError("closed"))

    def _end(self, exc: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_exception(exc)
            self.closed.exception()  # retrieved: nobody may be waiting any more
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


async def open_pubsub(
    url: str,
    on_reply: Reply,
    *,
    on_error: ErrorReply | None = None,
    on_replies: Replies | None = None,
    timeout: float = 2.0,
) -> PubSubConnection:
    """Connect to the Redis at `url` (redis://, rediss://, unix://) and authenticate; then
    replies go to `on_reply` (and `on_replies`, see `PubSubConnection`).

    Raises redis-py's `ConnectionError` (or `AuthenticationError`), as the hub expects."""
    opts = parse_url(url)
    loop = asyncio.get_running_loop()
    first: asyncio.Future[Any] = loop.create_future()

    def before_auth(reply: Any) -> None:
        if not first.done():
            first.set_result(reply)

    conn: PubSubConnection | None = None
    try:
        async with asyncio.timeout(timeout):
            factory = lambda: PubSubConnection(before_auth)  # noqa: E731
            if "path" in opts:
                _, conn = await loop.create_unix_connection(factory, opts["path"])
            else:
                tls = _tls(opts) if opts.get("connection_class") is SSLConnection else None
                _, conn = await loop.create_connection(
                    factory,
                    opts.get("host", "localhost"),
                    opts.get("port", 6379),
                    ssl=tls,
                )
            if opts.get("password") is not None:
                username = opts.get("username")
                conn.send("AUTH", *((username,) if username else ()), opts["password"])
                done, _ = await asyncio.wait({first, conn.closed}, return_when=asyncio.FIRST_COMPLETED)
                if first not in done:
                    raise AuthenticationError(f"Redis refused the pub/sub login: {conn.closed.exception()}")
    except (OSError, TimeoutError) as exc:
        if conn is not None:
            conn.close()
        raise ConnectionError(f"cannot reach Redis for pub/sub: {exc or 'timed out'}") from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    conn._on_reply, conn._on_error, conn._on_replies = on_reply, on_error, on_replies
    return conn


def _tls(opts: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if opts.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _encode(args: tuple[str, ...]) -> bytes:
    """A command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)
