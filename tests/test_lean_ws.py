"""jobwire's own websocket protocol (`server.lean_ws`), what `jobwire serve` runs: the
protocol's own edge cases against a small ASGI app on a real uvicorn (fragments, pings,
both close handshakes, oversize and malformed messages, a client that vanishes, refused
upgrades, the server's shutdown), and jobwire on it: direct writes and ping tracking see
everything they read, and `JOBWIRE_WS_PROTOCOL=uvicorn` falls back to uvicorn's own.

What it saves in memory is measured by the benchmark (`benchmarks/compare.py --idle`), not
here: a figure of a noisy machine is no test."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.exceptions import ConnectionClosed, InvalidStatus

import jobwire
from jobwire.server import direct, keepalive, lean_ws
from jobwire.server.lean_ws import LeanWebSocket, Writable
from jobwire.server.metrics import Tally
from jobwire.server.serving import uvicorn_config
from jobwire.tasks.recorder import Recorder
from tests.clients import next_of, until_subscribed
from tests.support import RedisServer, free_port, run_server, settings_for, wait_until

Message = dict[str, Any]


class EchoApp:
    """A plain ASGI websocket app: accepts (or refuses, by path), echoes what it receives,
    closes when told ("close:<code>:<reason>"), and keeps every message it received."""

    def __init__(self) -> None:
        self.received: list[Message] = []
        self.ended = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        try:
            assert (await receive())["type"] == "websocket.connect"
            if scope["path"] == "/deny":
                body = b'{"error": {"code": "too_many_connections"}}'
                headers = [(b"content-type", b"application/json"), (b"retry-after", b"2")]
                await send({"type": "websocket.http.response.start", "status": 429, "headers": headers})
                await send({"type": "websocket.http.response.body", "body": body[:10], "more_body": True})
                await send({"type": "websocket.http.response.body", "body": body[10:]})
                return
            if scope["path"] == "/forbid":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "websocket.accept", "headers": [(b"x-lean", b"yes")]})
            while True:
                message = await receive()
                self.received.append(message)
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is not None and text.startswith("close:"):
                    _, code, reason = text.split(":", 2)
                    await send({"type": "websocket.close", "code": int(code), "reason": reason})
                    continue
                await send({"type": "websocket.send", **{k: v for k, v in message.items() if k != "type"}})
        finally:
            self.ended.set()


@contextlib.asynccontextmanager
async def serving(app: Any, **config: Any) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """uvicorn serving `app` with the lean protocol (and httptools, as `jobwire serve`)."""
    port = free_port()
    options: dict[str, Any] = dict(
        host="127.0.0.1",
        port=port,
        ws=LeanWebSocket,
        http="httptools",
        lifespan="off",
        log_level="warning",
        ws_max_size=1024,
        ws_ping_interval=None,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(uvicorn.Config(app, **{**options, **config}))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), what="uvicorn is serving", interval=0.01)
    try:
        yield f"ws://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def _protocols(server: uvicorn.Server) -> list[LeanWebSocket]:
    return [c for c in server.server_state.connections if isinstance(c, LeanWebSocket)]


# -- a raw client, for what the websockets client will not do ---------------------------------


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | opcode])
        head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload); (-1, b"") at the end."""
        async with asyncio.timeout(timeout):
            try:
                b0, b1 = await self.reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return -1, b""
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def close_code(self) -> int:
        """The code of the server's close frame, skipping whatever comes before it."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0])
            assert opcode != -1, "the connection ended without a close frame"


UPGRADE = "Upgrade: websocket\r\nConnection: Upgrade\r\n"


async def raw_request(url: str, path: str, headers: str | None = None) -> tuple[bytes, RawClient]:
    """Send an upgrade request; the server's answer head (and body, if any) and the client."""
    host, port = url.removeprefix("ws://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    if headers is None:
        headers = UPGRADE + f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    return head, RawClient(reader, writer)


# -- the protocol ----------------------------------------------------------------------------


async def test_messages_whole_and_fragmented_reach_the_app_as_one() -> None:
    app = EchoApp()
    async with serving(app) as (url, _), websockets.connect(f"{url}/echo") as ws:
        assert ws.response.headers["x-lean"] == "yes"  # the accept's headers are in the 101
        await ws.send("whole")
        assert await ws.recv() == "whole"
        await ws.send(["frag", "men", "ted"])  # three frames: text, continuation, continuation
        assert await ws.recv() == "fragmented"
        await ws.send([b"\x00\x01", b"\x02"])
        assert await ws.recv() == b"\x00\x01\x02"
    received = [m.get("text", m.get("bytes")) for m in app.received if m["type"] == "websocket.receive"]
    assert received == ["whole", "fragmented", b"\x00\x01\x02"]


async def test_a_client_ping_is_answered_and_server_pings_keep_a_live_client() -> None:
    async with (
        serving(EchoApp(), ws_ping_interval=0.1, ws_ping_timeout=1.0) as (url, server),
        websockets.connect(f"{url}/echo", ping_interval=None) as ws,
    ):
        await asyncio.wait_for(await ws.ping(b"mine"), 5)  # our pong, with our payload
        [proto] = _protocols(server)
        await wait_until(lambda: proto.ping_sent_at > 0, what="a keepalive ping")
        first = proto.ping_sent_at
        # the client's pong chains the server's next ping
        await wait_until(lambda: proto.ping_sent_at > first, what="a second keepalive ping")
        await ws.send("still here")
        assert await ws.recv() == "still here"


async def test_a_client_that_answers_no_ping_is_closed_1011() -> None:
    async with serving(EchoApp(), ws_ping_interval=0.05, ws_ping_timeout=0.2) as (url, server):
        head, client = await raw_request(url, "/echo")
        assert head.startswith(b"HTTP/1.1 101")
        opcode, payload = await client.frame()
        assert opcode == 9 and len(payload) == 4  # a ping, with its random payload
        [proto] = _protocols(server)
        assert proto.pending_ping_payload == payload  # what StallWatch reads, through server.direct
        assert await client.close_code() == 1011  # never answered
        assert (await client.frame()) == (-1, b"")  # and the connection is gone
        await wait_until(lambda: not _protocols(server), what="the protocol released")


async def test_the_client_closes_and_the_server_echoes() -> None:
    app = EchoApp()
    async with serving(app) as (url, server):
        ws = await websockets.connect(f"{url}/echo")
        await ws.close(4001, "done here")
        assert ws.close_code == 4001  # the server echoed our close frame
        await asyncio.wait_for(app.ended.wait(), 5)
        assert app.received[-1] == {"type": "websocket.disconnect", "code": 4001, "reason": "done here"}
        await wait_until(lambda: not _protocols(server), what="the protocol released")


async def test_the_server_closes_and_the_client_echo_ends_the_connection() -> None:
    app = EchoApp()
    async with serving(app) as (url, server), websockets.connect(f"{url}/echo") as ws:
        await ws.send("close:4002:over and out")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4002, "over and out")
        await asyncio.wait_for(app.ended.wait(), 5)
        # the app heard its own close, once; the TCP connection ended on the client's echo,
        # not at the close timeout
        assert app.received[-1] == {"type": "websocket.disconnect", "code": 4002, "reason": "over and out"}
        await wait_until(lambda: not _protocols(server), what="the protocol released", timeout=5)


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
async def test_a_message_over_the_size_limit_is_closed_1009(fragmented: bool) -> None:
    app = EchoApp()
    async with serving(app, ws_max_size=1024) as (url, _):
        head, client = await raw_request(url, "/echo")
        assert head.startswith(b"HTTP/1.1 101")
        if fragmented:  # each fragment small, the message too big
            client.send(1, b"a" * 600, fin=False)
            client.send(0, b"a" * 600)
        else:
            client.send(1, b"a" * 1025)
        assert await client.close_code() == 1009
        await asyncio.wait_for(app.ended.wait(), 5)
    assert app.received[-1]["type"] == "websocket.disconnect" and app.received[-1]["code"] == 1009
    assert not [m for m in app.received if m["type"] == "websocket.receive"]


async def test_invalid_utf8_is_closed_1007_and_a_protocol_error_1002() -> None:
    app = EchoApp()
    async with serving(app) as (url, _):
        _, client = await raw_request(url, "/echo")
        client.send(1, b"\xff\xfe")
        assert await client.close_code() == 1007
        _, client = await raw_request(url, "/echo")
        client.send(0, b"no message to continue")
        assert await client.close_code() == 1002


async def test_a_client_that_vanishes_is_a_disconnect_for_the_app() -> None:
    app = EchoApp()
    async with serving(app) as (url, server):
        head, client = await raw_request(url, "/echo")
        assert head.startswith(b"HTTP/1.1 101")
        client.writer.transport.abort()  # no close frame: the socket just goes
        await asyncio.wait_for(app.ended.wait(), 5)
        assert app.received[-1]["type"] == "websocket.disconnect"
        state = server.server_state
        await wait_until(lambda: not (state.connections or state.tasks), what="the connection released")


async def test_refused_upgrades_are_http_answers() -> None:
    async with serving(EchoApp()) as (url, _):
        # the app's denial response, its body in two parts
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{url}/deny")
        response = refused.value.response
        assert response.status_code == 429 and response.headers["retry-after"] == "2"
        assert json.loads(response.body) == {"error": {"code": "too_many_connections"}}
        # a close before the accept
        with pytest.raises(InvalidStatus) as forbidden:
            await websockets.connect(f"{url}/forbid")
        assert forbidden.value.response.status_code == 403
        # a handshake websockets cannot accept: its own answer, then the end
        head, client = await raw_request(
            url, "/echo", headers="Upgrade: websocket\r\nConnection: Upgrade\r\n"
        )
        assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head
        assert b"Sec-WebSocket-Key" in await client.reader.read()


async def test_the_server_shutting_down_closes_open_sockets_1012() -> None:
    app = EchoApp()
    async with serving(app) as (url, server):
        ws = await websockets.connect(f"{url}/echo")
        server.should_exit = True
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1012
    assert app.received[-1] == {"type": "websocket.disconnect", "code": 1012}


async def test_many_sockets_ping_on_one_schedule_that_stays_small() -> None:
    """Every socket pinged, pong after pong, from one timer; the entries a pong leaves
    stale are dropped, so the schedule holds a few per socket, not one per ping."""
    n = 80
    async with serving(EchoApp(), ws_ping_interval=0.02, ws_ping_timeout=2.0) as (url, server):
        clients = [await websockets.connect(f"{url}/echo", ping_interval=None) for _ in range(n)]
        protos = _protocols(server)
        assert len(protos) == n
        firsts: dict[LeanWebSocket, float] = {}

        def pinged_again_and_again() -> bool:
            for proto in protos:
                if proto.ping_sent_at and proto not in firsts:
                    firsts[proto] = proto.ping_sent_at
            return len(firsts) == n and all(p.ping_sent_at >= firsts[p] + 0.04 for p in protos)

        await wait_until(pinged_again_and_again, what="every socket pinged again and again")
        schedule = keepalive.schedule(asyncio.get_running_loop())
        assert len(schedule._heap) <= 3 * n
        for ws in clients:
            await ws.send("alive")
            assert await ws.recv() == "alive"
            await ws.close()
        await wait_until(lambda: not _protocols(server), what="every socket closed")
        assert all(p.keepalive_due == 0.0 for p in protos)  # nothing more scheduled for them


async def test_a_send_waits_while_the_buffer_is_full_and_a_cancelled_one_leaves_the_others() -> None:
    flag = Writable()
    flag.clear()
    first, second = asyncio.create_task(flag.wait()), asyncio.create_task(flag.wait())
    await wait_until(lambda: len(flag._waiters or ()) == 2, what="both sends wait on the flag")
    assert not first.done() and not second.done()
    first.cancel()
    await asyncio.wait({first})  # its cancellation is through
    flag.set()
    await asyncio.wait_for(second, 1)
    assert first.cancelled() and flag.is_set()
    await asyncio.wait_for(flag.wait(), 1)  # set: no wait


# -- jobwire on it -------------------------------------------------------------------------------


async def test_jobwire_serves_it_and_direct_reads_everything_from_it(own_redis: RedisServer) -> None:
    """The default protocol; every feature of `server.direct` on, by design."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("lean", "PENDING")
    async with run_server(settings) as srv, websockets.connect(f"{srv.ws_url}/ws") as ws:
        assert srv.server.config.ws_protocol_class is LeanWebSocket
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["lean"]}))
        await until_subscribed(ws, "lean")
        [proto] = _protocols(srv.server)
        every = {k: v for needs in direct.WEBSOCKET_NEEDS.values() for k, v in needs.items()}
        assert direct.problems(proto, every) == {}
        assert direct._websocket_classes[LeanWebSocket] == frozenset(direct.WEBSOCKET_NEEDS)
        send = proto.send
        write = direct.frame_writer(send, Tally())
        assert write is not None
        proto.pause_writing()  # the transport's flow control: no direct write while full
        assert write(b"", 0) is False
        proto.resume_writing()
        assert write(b"", 0) is True
        since = direct.ping_waiting_since(send)
        assert since is not None and since() is None
        sock = proto.transport.get_extra_info("socket")  # bound_kernel_buffer took
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) in (
            settings.socket_send_buffer,
            2 * settings.socket_send_buffer,
        )
        await ws.send(json.dumps({"op": "ping"}))
        await next_of(ws, "pong")
        recorder.record("lean", "SUCCESS", result=1)
        assert (await next_of(ws, "event"))["state"] == "SUCCESS"


async def test_a_session_runs_past_the_asgi_call_unless_a_host_wraps_jobwire(own_redis: RedisServer) -> None:
    """Served alone, a socket's session is its connection's only task (the middleware and
    the router hold nothing for it); mounted in a host, whose middleware may expect the
    call to last as long as the socket, it stays inside the call. Both serve events."""
    settings = settings_for(own_redis.url)
    Recorder(own_redis.client(), settings).record("detached", "PENDING")
    host = Starlette()
    jobwire.mount(host, "/progress", settings=settings)
    for app, prefix, detached in ((None, "", True), (host, "/progress", False)):
        async with run_server(settings, app=app) as srv, websockets.connect(f"{srv.ws_url}{prefix}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ["detached"]}))
            await until_subscribed(ws, "detached")
            [proto] = _protocols(srv.server)
            assert proto._detached is detached
            [task] = srv.server.server_state.tasks
            running = task.get_coro().__qualname__  # type: ignore[union-attr]
            assert running == ("_multi_session" if detached else "LeanWebSocket._run_asgi")
            await ws.send(json.dumps({"op": "ping"}))
            await next_of(ws, "pong")
        assert not srv.server.server_state.tasks  # the session ended with the server


async def test_the_uvicorn_setting_serves_uvicorns_own_protocol(own_redis: RedisServer) -> None:
    settings = settings_for(own_redis.url, ws_protocol="uvicorn")
    assert uvicorn_config(object(), settings, host="127.0.0.1", port=1).ws == "auto"
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("fallback", "PENDING")
    async with run_server(settings) as srv, websockets.connect(f"{srv.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["fallback"]}))
        await until_subscribed(ws, "fallback")
        [proto] = srv.server.server_state.connections
        assert type(proto) is WebSocketsSansIOProtocol
        recorder.record("fallback", "SUCCESS", result=1)
        assert (await next_of(ws, "event"))["state"] == "SUCCESS"


# -- a connection lost early, and a shutdown while a close drains ---------------------------


class _HeldTransport(asyncio.Transport):
    """A transport of our own: it keeps what is written, and reports the connection lost
    on close only when `drains` (else the close waits, as for a buffer not yet sent)."""

    def __init__(self, proto: LeanWebSocket, drains: bool = True) -> None:
        super().__init__()
        self.proto, self.drains, self.closing, self.out = proto, drains, False, []

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.drains:
                asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.1", 5), "sockname": ("127.0.0.1", 8000)}.get(name, default)


RAW_UPGRADE = (
    b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
CLIENT_CLOSE = b"\x88\x82\x00\x00\x00\x00\x03\xe8"  # masked with a zero key: code 1000


async def _accepted(drains: bool = True) -> tuple[LeanWebSocket, _HeldTransport, Any, ServerState]:
    sends: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        sends.set_result(send)
        await asyncio.Event().wait()

    config = uvicorn.Config(app=app, ws=LeanWebSocket, log_level="warning", lifespan="off")
    config.load()
    state = ServerState()
    proto = LeanWebSocket(config, state, {})
    transport = _HeldTransport(proto, drains)
    proto.connection_made(transport)
    proto.data_received(RAW_UPGRADE)
    return proto, transport, await sends, state


async def test_a_connection_lost_at_once_does_not_turn_direct_writes_off_for_the_next() -> None:
    """The features of a protocol class are probed on its first connection; a connection
    already lost (its websocket state let go) must not be that probe."""
    direct._websocket_classes.pop(LeanWebSocket, None)
    proto, _, send, state = await _accepted()
    proto.data_received(CLIENT_CLOSE)
    await wait_until(lambda: proto.conn is None, what="the connection is lost")
    assert direct.frame_writer(send, Tally()) is None  # nothing to write to, and not cached
    _, _, healthy, state2 = await _accepted()
    assert direct.frame_writer(healthy, Tally()) is not None
    for task in [*state.tasks, *state2.tasks]:
        task.cancel()


async def test_shutdown_after_the_clients_close_while_our_buffer_drains() -> None:
    """The client's close came, ours waits on the buffer: uvicorn's shutdown must not try
    to send a second close (websockets raised InvalidState, and uvicorn's loop stopped)."""
    proto, transport, _, state = await _accepted(drains=False)
    proto.data_received(CLIENT_CLOSE)
    assert transport.closing and proto.conn is not None
    proto.shutdown()  # raised InvalidState('connection is closing')
    for task in state.tasks:
        task.cancel()


# -- a client that stops reading: the connection is cut, not left to a flush that never ends ---


class FloodThenEnd:
    """Accepts, then sends 16 KiB messages until some wait in the transport's own buffer (the
    client reads nothing, the kernel's buffers are full), then ends as its path says:
    /close sends a close frame and returns, /return returns without one, /wait waits (for
    the keepalive ping, stuck behind the rest, to go unanswered)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        transport = send.__self__.transport  # the LeanWebSocket's
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while not transport.get_write_buffer_size():
            await send({"type": "websocket.send", "bytes": b"x" * 16384})
        if scope["path"] == "/close":
            await send({"type": "websocket.close", "code": 1000})
        elif scope["path"] == "/wait":
            while (await receive())["type"] != "websocket.disconnect":
                pass


async def _stalled_client(url: str, path: str) -> socket.socket:
    """A raw websocket client with a 4 KiB receive window that reads the upgrade's answer
    and nothing more."""
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("ws://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    headers = f"Host: {host}\r\n{UPGRADE}Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    request = f"GET {path} HTTP/1.1\r\n{headers}\r\n"
    await loop.sock_sendall(sock, request.encode())
    head = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


@pytest.mark.parametrize("path", ["/close", "/return", "/wait"], ids=["close-timeout", "app-ends", "no-pong"])
async def test_a_client_that_stops_reading_is_cut_off_not_left_open(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our close frame (or the app's end, or the missing pong's 1011) waits behind frames the
    client never reads: a plain transport close waits for that buffer to drain, forever. At
    the close timeout the connection is reset (the client sees an RST) and the server's
    socket and protocol are gone."""
    monkeypatch.setattr(lean_ws, "CLOSE_TIMEOUT", 0.3)
    async with serving(FloodThenEnd(), ws_ping_interval=0.1, ws_ping_timeout=0.3) as (url, server):
        sock = await _stalled_client(url, path)
        try:
            await wait_until(lambda: _protocols(server), what="the upgrade is served")
            [proto] = _protocols(server)
            server_sock = proto.transport.get_extra_info("socket")
            await wait_until(lambda: not _protocols(server), what="the connection is cut off", timeout=5)
            assert server_sock.fileno() == -1  # the server's socket is closed, not lingering
            loop = asyncio.get_running_loop()
            with pytest.raises(ConnectionResetError):  # a reset: what was unread is dropped
                async with asyncio.timeout(5):
                    while await loop.sock_recv(sock, 1 << 16):
                        pass
        finally:
            sock.close()
