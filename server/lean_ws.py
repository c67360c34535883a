"""jobwire's own websocket protocol for uvicorn (`Config(ws=LeanWebSocket)`): what an idle
connection needs, and little more.

Why: an idle, subscribed websocket cost 37 KiB of server memory under uvicorn's
websockets-sansio protocol, and 20 KiB of it was not jobwire's: an `asyncio.Queue` of
received messages and an `asyncio.Event` for flow control per connection (each with its
deques from birth), the handshake's `Request` and `Response` kept for the connection's
life (by the protocol, and by the suspended parser of websockets' `ServerProtocol`, which
had parsed the request), a timer per keepalive step, and the ASGI call itself: a frame
for every middleware, the router and Starlette's exception wrappers, suspended for as
long as the socket lives. At 10,000 connections, 200 MB of bookkeeping for sockets that
say nothing.

This protocol speaks the same ASGI websocket protocol (with the denial response
extension) through websockets' sans-I/O `ServerProtocol`, as uvicorn's does, and keeps
less:

- The handshake is parsed and answered by a `ServerProtocol` thrown away at once; the
  connection runs on a second one, created open, whose parser never saw the request.
  The 101 response waits only until the app's `websocket.accept`.
- Received messages wait in a list made when one arrives, and `receive` sleeps on a
  future made when it has to; reading pauses while a message waits (as uvicorn's does).
- Flow control is a flag (`Writable`), with a future per send only while sends wait.
- Keepalive pings are steps in one schedule per event loop (`server.keepalive`), not a
  timer each; the one timer of a connection's own is its close handshake's deadline.
- An accepted socket's session can run past the ASGI call, in a task of its own
  (`detach`): the middleware and the router then hold nothing for it.
- The scope's headers share their names, and the values every client sends alike.

`server.direct` reads the same attributes from it as from uvicorn's protocol (`transport`,
`writable`, `close_sent`, `conn.extensions`, `pending_ping_payload`, `ping_sent_at`,
`handshake_complete`), and its direct writer and ping state are methods of its own:
direct writes, ping tracking for `StallWatch`, the kernel buffer bound and cutting off
work on it by design. `JOBWIRE_WS_PROTOCOL=uvicorn` serves websockets with uvicorn's own
protocol instead (see `server.serving`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import struct
import sys
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)
from uvicorn.server import ServerState
from websockets import __version__ as websockets_version
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from jobwire.server import keepalive

# uvicorn's logger: its handlers, and the filters put on it (the redaction of tokens in
# upgrade lines, `server.auth.RedactTokens`), apply to this protocol's lines as to uvicorn's.
log = logging.getLogger("uvicorn.error")

# Timeouts
CLOSE_TIMEOUT = 10.0  # seconds a client has to answer our close frame before the TCP close

#: The header values websockets hands over are decoded as ISO-8859-1 from 17.0 (before
#: that, with surrogate escapes); encoded back the same way for the ASGI scope.
_HEADER_ENCODING = (
    ("latin-1", "strict")
    if tuple(int(p) for p in websockets_version.split(".")[:1] if p.isdigit()) >= (17,)
    else ("ascii", "surrogateescape")
)

Message = dict[str, Any]


class Writable:
    """Whether the transport's buffer is below its high-water mark: what uvicorn keeps in
    an `asyncio.Event`, which holds a deque of waiters from birth (850 bytes a
    connection). A flag, and a future per send only while sends wait."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter  # one future each: a cancelled send leaves the others waiting


#: Values every connection's scope has alike, kept once: ASGI versions, listener addresses.
_SHARED: dict[Any, Any] = {}


def _shared(value: Any) -> Any:
    if len(_SHARED) > 256:  # only ever a few; bounded all the same
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


def _asgi(version: str) -> dict[str, str]:
    """The scope's `asgi`, one dict per version (no app writes to it)."""
    asgi: dict[str, str] | None = _SHARED.get(("asgi", version))
    if asgi is None:
        asgi = _SHARED[("asgi", version)] = {"version": version, "spec_version": "2.4"}
    return asgi


#: Header names, and the values of those every client of a deployment sends alike (the
#: host, the upgrade, a browser's user agent and languages), kept once for all scopes:
#: each connection's scope holds its headers for the connection's life.
_HEADERS: dict[bytes, bytes] = {}
_ALIKE = frozenset(
    b"host upgrade connection sec-websocket-version sec-websocket-extensions origin user-agent "
    b"accept-encoding accept-language cache-control pragma".split()
)


def _header(name: str, value: bytes) -> tuple[bytes, bytes]:
    if len(_HEADERS) > 4096:  # bounded: user agents are many, but not that many
        _HEADERS.clear()
    key = name.lower().encode("ascii")
    key = _HEADERS.setdefault(key, key)
    if key in _ALIKE and len(value) <= 256:
        value = _HEADERS.setdefault(value, value)
    return key, value


class LeanWebSocket(asyncio.Protocol):
    """A websocket connection, from the upgrade request uvicorn hands over to the close
    (see the module docstring). uvicorn builds one per upgrade, as it would its own."""

    __slots__ = (
        "config",
        "server_state",
        "app_state",
        "transport",
        "scope",
        "conn",
        "writable",
        "handshake_complete",
        "close_sent",
        "disconnected",
        "pending_ping_payload",
        "ping_sent_at",
        "_handshake",
        "_response",
        "_denial",
        "_inbox",
        "_waiter",
        "_read_paused",
        "_timer",
        "keepalive_due",
        "_parts",
        "_text",
        "_gone",
        "_detached",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover - uvicorn loads it before serving
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.scope: dict[str, Any] | None = None
        # websockets' protocol of the open connection (None until the request is in)
        self.conn: ServerProtocol | None = None
        self.writable = Writable()
        self.handshake_complete = False  # accepted, refused, or gone
        self.close_sent = False  # set by every way of ours out of the open state
        self.disconnected = False
        # Keepalive: the payload of the ping awaiting its pong (None while none is), and
        # when (loop time) it was sent. `server.stalls` reads both (through `server.direct`).
        self.pending_ping_payload: bytes | None = None
        self.ping_sent_at = 0.0
        self._handshake: ServerProtocol | None = None  # parses the request
        self._response: Response | None = None  # the 101, until the app accepts
        self._denial: tuple[int, list[tuple[str, str]], bytes] | None = None  # an HTTP answer being sent
        self._inbox: list[Message] | None = None  # received, not yet taken by the app
        self._waiter: asyncio.Future[None] | None = None  # the app's receive, sleeping
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None  # the close handshake's deadline
        self.keepalive_due = 0.0  # loop time of its next keepalive step in the schedule (0: none)
        self._parts: list[bytes] | None = None  # a fragmented message's frames so far
        self._text = False  # that message's type
        self._gone: Message | None = None  # the disconnect, once said: said again to a later receive
        self._detached = False  # the app's session runs on past its ASGI call (see `detach`)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._stop_keepalive()
        self._say_gone({"type": "websocket.disconnect", "code": 1005 if self.handshake_complete else 1006})
        self.server_state.connections.discard(self)  # type: ignore[arg-type]
        self.handshake_complete = self.disconnected = True
        # Let go of what only an open connection needs (a stale keepalive entry may hold
        # this object a little longer).
        self._handshake = self.conn = self.scope = None
        self._response = None
        # asyncio never resumes writing on a transport lost while paused: free the senders.
        self.writable.set()
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        pass  # the transport closes; connection_lost says the client is gone

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            self._handshake_data(data)
            return
        conn.receive_data(data)
        for event in conn.events_received():
            self._frame(event)  # type: ignore[arg-type]
        if conn.parser_exc is not None:
            self._failed(conn)
        else:
            self._write_pending(conn)  # the pong to a ping, if any

    def shutdown(self) -> None:
        """uvicorn's server is shutting down (after jobwire's 1001 goodbyes): close with
        1012 what is still open, answer 500 to what is still handshaking."""
        self._stop_keepalive()
        if self.close_sent:
            self._close_transport()  # keeps the close handshake's deadline, if it runs
            return
        if self.handshake_complete and self.conn is not None:
            self._say_gone({"type": "websocket.disconnect", "code": 1012})
            if self.conn.state is OPEN:  # the client's close may have come already
                self.conn.send_close(1012)
                self._write_pending(self.conn)
        elif not self.handshake_complete:
            self._send_500()
        self._close_transport()

    # -- the handshake -------------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        if self.handshake_complete:
            return  # refused: what follows is discarded
        handshake = self._handshake
        if handshake is None:
            factories = []
            if self.config.ws_per_message_deflate:
                factories = [  # uvicorn's settings
                    ServerPerMessageDeflateFactory(
                        server_max_window_bits=12,
                        client_max_window_bits=12,
                        compress_settings={"memLevel": 5},
                    )
                ]
            handshake = self._handshake = ServerProtocol(
                extensions=factories, max_size=self.config.ws_max_size, logger=log
            )
        handshake.receive_data(data)
        requests = [e for e in handshake.events_received() if isinstance(e, Request)]
        if not requests:
            if handshake.handshake_exc is not None:  # websockets answered (400, 414, 431)
                self._reply_and_close(b"".join(handshake.data_to_send()))
            return  # the rest of the head is on its way
        request = requests[0]
        response = handshake.accept(request)
        self._handshake = None
        if response.status_code != 101:
            self._reply_and_close(response.serialize())
            return
        self._response = response
        # The connection's own protocol: open from the start, its parser never saw the request.
        conn = self.conn = ServerProtocol(state=OPEN, max_size=self.config.ws_max_size, logger=log)
        conn.extensions = handshake.extensions
        self.scope = scope = self._scope(request)
        self._push({"type": "websocket.connect"})
        task = asyncio.get_running_loop().create_task(self._run_asgi(scope))
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _scope(self, request: Request) -> dict[str, Any]:
        encoding, errors = _HEADER_ENCODING
        headers = [_header(k, v.encode(encoding, errors)) for k, v in request.headers.raw_items()]
        raw_path, _, query_string = request.path.partition("?")
        subprotocols = [
            token.strip()
            for header in request.headers.get_all("Sec-WebSocket-Protocol")
            for token in header.split(",")
        ]
        root_path = self.config.root_path
        transport = self.transport
        client = get_remote_addr(transport)
        return {
            "type": "websocket",
            "asgi": _asgi(self.config.asgi_version),
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(transport) else "ws",
            "server": _shared(get_local_addr(transport)),  # the listener's: one tuple for all
            "client": (sys.intern(client[0]), client[1]) if client else None,
            "root_path": root_path,
            "path": root_path + unquote(raw_path),
            "raw_path": root_path.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query_string.encode("ascii"),
            "headers": headers,
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }

    async def _run_asgi(self, scope: dict[str, Any]) -> None:
        try:
            result = await self.config.loaded_app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            log.exception("Exception in ASGI application\n")
            self._send_500()
        else:
            if self._detached:
                return  # the session goes on; its end ends the connection
            if not self.handshake_complete:
                log.error("ASGI callable returned without completing handshake.")
                self._send_500()
            elif result is not None:
                log.error("ASGI callable should return None, but returned '%s'.", result)
        self._end()

    def detach(self, session: Coroutine[Any, Any, None]) -> None:
        """Run `session`, the rest of an accepted websocket's handler, in a task of its
        own: the app's ASGI call may then return, and the connection lasts until `session`
        ends (then it is closed, as at the end of an ASGI call).

        Why: an ASGI call suspended for a connection's life keeps a coroutine frame (and
        closures) alive for every middleware, the router, the route and its exception
        wrappers, and a task to hold them: 7 KB an idle connection, more than the rest of
        the protocol. `server.direct.detach` hands a session over only where nothing of a
        host's wraps jobwire's app (a host's middleware may expect the call to last as long
        as the socket)."""
        self._detached = True
        task = asyncio.get_running_loop().create_task(session)
        self.server_state.tasks.add(task)
        task.add_done_callback(self._session_done)  # a callback, not a wrapping coroutine: smaller

    def _session_done(self, task: asyncio.Task[None]) -> None:
        self.server_state.tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, ClientDisconnected):
                log.error("Exception in ASGI application (a detached websocket session)\n", exc_info=exc)
        self._end()

    def _end(self) -> None:
        """The app is done with the connection: close it, unless the close handshake we
        began waits for the client's answer (then that, or its deadline, ends it)."""
        if not (self.close_sent and self._timer is not None):
            self._close_transport()

    # -- received frames -------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._text = opcode is Opcode.TEXT
            if frame.fin:
                self._message(frame.data)
            else:
                self._parts = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            parts = self._parts
            if parts is None:  # pragma: no cover - websockets raises a protocol error first
                return
            parts.append(bytes(frame.data))
            if frame.fin:
                self._parts = None
                self._message(b"".join(parts))
        elif opcode is Opcode.PONG:
            self._pong(frame)
        elif opcode is Opcode.CLOSE:
            self._closed_by_client()
        # PING: websockets has queued the pong; data_received writes it.

    def _message(self, data: bytes | bytearray | memoryview) -> None:
        if self.close_sent:
            # The app is past its `websocket.close`: drop the message, so reading goes on
            # until the client's close arrives.
            return
        if self._text:
            try:
                message: Message = {"type": "websocket.receive", "text": bytes(data).decode()}
            except UnicodeDecodeError:
                conn = self.conn
                assert conn is not None
                conn.fail(1007, "invalid UTF-8 in a text message")
                self._failed(conn)
                return
        else:
            message = {"type": "websocket.receive", "bytes": bytes(data)}
        self._push(message)
        if not self._read_paused:  # one message at a time: the app reads it, then the next
            self._read_paused = True
            self.transport.pause_reading()

    def _closed_by_client(self) -> None:
        conn = self.conn
        assert conn is not None
        if self.close_sent:
            # The echo of our close: the closing handshake is complete.
            self._close_transport()
            return
        if not self.transport.is_closing():
            close = conn.close_rcvd
            code, reason = (close.code, close.reason) if close is not None else (1005, "")
            self._say_gone({"type": "websocket.disconnect", "code": code, "reason": reason})
            self._write_pending(conn)  # our echo
            self._close_transport()

    def _failed(self, conn: ServerProtocol) -> None:
        """websockets failed the connection (a protocol error, a message over `ws_max_size`:
        1009, invalid UTF-8: 1007): its close frame goes out and the app hears why."""
        close = conn.close_sent
        code, reason = (close.code, close.reason) if close is not None else (1006, "")
        self._say_gone({"type": "websocket.disconnect", "code": code, "reason": reason})
        self._write_pending(conn)
        self.close_sent = True
        self._stop_keepalive()
        self._close_transport()

    # -- what server.direct uses ---------------------------------------------------------------

    def write_frames(self, written: Any, frames: bytes, n: int = 1) -> bool:
        """Write ready-made frames (`n` of them, joined) if the socket takes them at once,
        counting them in `written` (a `Tally`); False if not (its buffer is over the
        high-water mark, or it is closing): then they take the ASGI path. The direct
        writer of `server.direct.frame_writer`, as a method rather than a closure."""
        if not self.writable._set or self.close_sent or self.transport.is_closing():
            return False
        self.transport.write(frames)
        written.n += n
        return True

    def ping_waiting_since(self) -> float | None:
        """Since when (loop time) the pong to the keepalive ping is awaited; None while none
        is (see `server.stalls`)."""
        return self.ping_sent_at if self.pending_ping_payload is not None else None

    # -- keepalive -------------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        interval = self.config.ws_ping_interval
        if interval is not None and interval > 0:
            loop = asyncio.get_running_loop()
            keepalive.schedule(loop).at(loop.time() + interval, self)

    def _stop_keepalive(self) -> None:
        if self.keepalive_due:
            keepalive.schedule(asyncio.get_running_loop()).drop(self)
        self.pending_ping_payload = None

    def keepalive_step(self) -> None:
        """Called by the schedule: send the next ping, or give up on the pong awaited."""
        if self.pending_ping_payload is None:
            self._ping()
        else:
            self._pong_missing()

    def _ping(self) -> None:
        conn = self.conn
        if self.close_sent or conn is None or self.transport.is_closing():
            return
        # A random payload names this ping: a stale or unsolicited pong is ignored.
        payload = self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
        loop = asyncio.get_running_loop()
        self.ping_sent_at = now = loop.time()
        conn.send_ping(payload)
        self._write_pending(conn)
        timeout = self.config.ws_ping_timeout
        if timeout is not None:
            keepalive.schedule(loop).at(now + timeout, self)
        else:  # pragma: no cover - jobwire always sets one: ping on, answered or not
            self.pending_ping_payload = None
            self._start_keepalive()

    def _pong(self, frame: Frame) -> None:
        if self.pending_ping_payload is None or bytes(frame.data) != self.pending_ping_payload:
            return  # unsolicited, or the answer to an older ping
        self.pending_ping_payload = None
        interval = self.config.ws_ping_interval
        if interval:  # the next ping `interval` after this one, whatever the round trip took
            keepalive.schedule(asyncio.get_running_loop()).at(self.ping_sent_at + interval, self)
        else:  # pragma: no cover
            self.keepalive_due = 0.0

    def _pong_missing(self) -> None:
        self.pending_ping_payload = None
        conn = self.conn
        if self.close_sent or conn is None or self.transport.is_closing():
            return
        conn.fail(1011, "keepalive ping timeout")
        self._write_pending(conn)
        self.close_sent = True
        self._stop_keepalive()
        self._close_transport()

    def _close_transport(self) -> None:
        """Close the transport, and cut the connection off if it is still there
        `CLOSE_TIMEOUT` later.

        Why: `transport.close()` waits for its buffer to drain, and a client that stopped
        reading (a zero TCP window) with frames of ours unsent never drains it: the socket
        stayed open for good, after our close frame, a missing pong or the app's end alike.
        A close that flushes in time ends the connection first (`connection_lost` cancels
        the timer)."""
        if self.disconnected:
            return
        self.transport.close()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._cut_off)

    def _cut_off(self) -> None:
        """The close's deadline passed: reset the connection, dropping what the client has
        not taken (`server.direct`'s cut-off: a zero linger, then an abort)."""
        self._timer = None
        # Imported here: `server.direct` imports this module, for its protocol class.
        from jobwire.server.direct import _cut_off

        _cut_off(self.transport)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- ASGI ------------------------------------------------------------------------------------

    async def receive(self) -> Message:
        while True:
            inbox = self._inbox
            if inbox:
                message = inbox.pop(0)
                if not inbox:
                    self._inbox = None
                    if self._read_paused and not self.transport.is_closing():
                        self._read_paused = False
                        self.transport.resume_reading()
                return message
            if self._gone is not None:
                return self._gone  # said once already: said again, never a wait forever
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def send(self, message: Message) -> None:
        if not self.writable._set:
            await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        kind = message["type"]
        if self._denial is not None:
            self._denial_body(message)
        elif not self.handshake_complete:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._forbid()
            elif kind == "websocket.http.response.start":
                self._denial_start(message)
            else:
                raise RuntimeError(
                    "Expected ASGI message 'websocket.accept', 'websocket.close' "
                    f"or 'websocket.http.response.start' but got {kind!r}."
                )
        elif not self.close_sent:
            conn = self.conn
            assert conn is not None
            try:
                if kind == "websocket.send":
                    data = message.get("bytes")
                    if data is not None:
                        conn.send_binary(data)
                    else:
                        text = message.get("text")
                        if text is not None:
                            conn.send_text(text.encode())
                    self._write_pending(conn)
                elif kind == "websocket.close":
                    self._close(conn, message.get("code", 1000), message.get("reason") or "")
                else:
                    raise RuntimeError(
                        f"Expected ASGI message 'websocket.send' or 'websocket.close', but got {kind!r}."
                    )
            except InvalidState:  # the client's close came first
                raise ClientDisconnected() from None
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r}, after sending 'websocket.close'.")

    def _accept(self, message: Message) -> None:
        scope = self.scope
        assert scope is not None
        log.info('%s - "WebSocket %s" [accepted]', get_client_addr(scope), get_path_with_query_string(scope))  # type: ignore[arg-type]
        response, self._response = self._response, None
        assert response is not None
        headers = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in (*self.server_state.default_headers, *message.get("headers", ()))
        ]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            headers.append(("Sec-WebSocket-Protocol", subprotocol))
        del response.headers["Date"]
        response.headers.update(headers)
        if not self.transport.is_closing():
            self.handshake_complete = True
            self.transport.write(response.serialize())
            self._start_keepalive()

    def _forbid(self) -> None:
        """A close before the accept: HTTP 403, as uvicorn answers it."""
        scope = self.scope
        assert scope is not None
        log.info('%s - "WebSocket %s" 403', get_client_addr(scope), get_path_with_query_string(scope))  # type: ignore[arg-type]
        self._say_gone({"type": "websocket.disconnect", "code": 1006})
        self._reply_and_close(_response(HTTPStatus.FORBIDDEN, [], b""))

    def _denial_start(self, message: Message) -> None:
        status = message["status"]
        if not 100 <= status < 600:
            raise RuntimeError(f"Invalid HTTP status code '{status}' in response.")
        scope = self.scope
        assert scope is not None
        log.info('%s - "WebSocket %s" %d', get_client_addr(scope), get_path_with_query_string(scope), status)  # type: ignore[arg-type]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())]
        self._denial = (status, headers, b"")

    def _denial_body(self, message: Message) -> None:
        if message["type"] != "websocket.http.response.body":
            raise RuntimeError(
                f"Expected ASGI message 'websocket.http.response.body' but got {message['type']!r}."
            )
        assert self._denial is not None
        status, headers, body = self._denial
        body += message.get("body", b"")
        if message.get("more_body", False):
            self._denial = (status, headers, body)
            return
        self._denial = None
        self._say_gone({"type": "websocket.disconnect", "code": 1006})
        self._reply_and_close(_response(status, headers, body))

    def _close(self, conn: ServerProtocol, code: int, reason: str) -> None:
        if self.transport.is_closing():
            return
        self._say_gone({"type": "websocket.disconnect", "code": code, "reason": reason})
        conn.send_close(code, reason)
        self._write_pending(conn)
        self.close_sent = True
        self._stop_keepalive()
        if self._read_paused:  # read on, for the client's close
            self._read_paused = False
            self.transport.resume_reading()
        self._cancel_timer()
        # The client's echo of our close ends the connection; failing that, the deadline
        # resets it (a plain close would wait on a client that reads nothing, forever).
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._cut_off)

    # -- helpers ---------------------------------------------------------------------------------

    def _push(self, message: Message) -> None:
        if self._inbox is None:
            self._inbox = [message]
        else:
            self._inbox.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _say_gone(self, message: Message) -> None:
        """The app hears of the end once, with the first reason known."""
        if self._gone is None:
            self._gone = message
            self._push(message)

    def _write_pending(self, conn: ServerProtocol) -> None:
        data = b"".join(conn.data_to_send())
        if data:
            self.transport.write(data)

    def _reply_and_close(self, data: bytes) -> None:
        self.handshake_complete = self.close_sent = True
        self._response = None
        self.transport.write(data)
        self._close_transport()

    def _send_500(self) -> None:
        if self._denial is not None or self.handshake_complete:
            return
        self._reply_and_close(_response(HTTPStatus.INTERNAL_SERVER_ERROR, [], b"Internal Server Error"))


def _response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """An HTTP answer to an upgrade request, closing the connection."""
    response_headers = Headers(headers)
    response_headers.setdefault("Date", email.utils.formatdate(usegmt=True))
    response_headers.setdefault("Connection", "close")
    response_headers.setdefault("Content-Length", str(len(body)))
    response_headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return Response(status, phrase, response_headers, body).serialize()
