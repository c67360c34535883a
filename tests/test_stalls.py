"""Stalled readers are jobwire's to close: 1013 by the stall policy, before uvicorn's
keepalive ping timeout (1011), and the server's end of the connection gone within seconds,
not left ESTABLISHED on a reader that never reads."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
import redis
from websockets.client import ClientProtocol
from websockets.frames import Close
from websockets.http11 import Response
from websockets.uri import parse_uri

from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import RedisServer, RunningServer, run_server, settings_for, wait_until

PROC_NET_TCP = Path("/proc/net/tcp")
# Linux only (the kernel's TCP table tells whether the server's socket is gone); in CI, which
# runs on Linux, a missing table fails the module instead of skipping it.
pytestmark = pytest.mark.skipif(
    not PROC_NET_TCP.exists() and not os.environ.get("CI"),
    reason="reads the kernel's TCP table (/proc/net/tcp): Linux only",
)


class RawReader:
    """A websocket client on a raw socket with a 4 KiB receive window that reads the
    handshake's answer and then nothing, until told to: it answers no ping, and once the
    window is full the server's sends block."""

    def __init__(self, sock: socket.socket, conn: ClientProtocol) -> None:
        self.sock, self.conn = sock, conn

    @classmethod
    async def open(cls, url: str) -> RawReader:
        loop = asyncio.get_running_loop()
        uri = parse_uri(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (uri.host, uri.port))
        conn = ClientProtocol(uri, max_size=None)
        conn.send_request(conn.connect())
        await loop.sock_sendall(sock, b"".join(conn.data_to_send()))
        while not any(isinstance(e, Response) for e in conn.events_received()):
            conn.receive_data(await loop.sock_recv(sock, 4096))
        assert conn.handshake_exc is None, conn.handshake_exc
        return cls(sock, conn)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def read_until_close(self) -> Close | None:
        """Read again, everything, up to the server's close frame (None: none came)."""
        loop = asyncio.get_running_loop()
        while self.conn.close_rcvd is None:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), 10)
            except ConnectionResetError:
                break
            if not data:
                break
            self.conn.receive_data(data)
        return self.conn.close_rcvd

    def close(self) -> None:
        self.sock.close()


def server_end(server_port: int, peer_port: int) -> str | None:
    """The state of the server's end of the TCP connection from `peer_port`, from the
    kernel's table (None once there is none): what `ss` would show."""
    for line in PROC_NET_TCP.read_text().splitlines()[1:]:
        _, local, remote, state, *_ = line.split()
        if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == peer_port:
            return {"01": "ESTABLISHED", "04": "FIN_WAIT1", "06": "TIME_WAIT"}.get(state, state)
    return None


def _port(srv: RunningServer) -> int:
    return int(srv.url.rsplit(":", 1)[1])


async def test_stalled_reader_at_the_defaults_is_closed_1013_and_its_socket_is_gone(
    own_redis: RedisServer,
) -> None:
    """Two readers stall on a job with events to send, at the default stall timeout and
    uvicorn settings. Both are closed by jobwire (1013, "too slow") before any ping
    timeout; one reads again and sees that close; the other never reads again, and the
    server's end of its connection is gone within a few seconds of the close."""
    settings = settings_for(own_redis.url)
    assert settings.stall_timeout == Settings().stall_timeout  # the default
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    recorder.record("stalled", "PENDING")
    async with run_server(settings) as srv:
        # uvicorn gives up on a ping only after jobwire's stall timeout and a scan (1 s)
        assert srv.server.config.ws_ping_timeout > settings.stall_timeout + 2
        silent = await RawReader.open(f"{srv.ws_url}/ws/jobs/stalled")
        waking = await RawReader.open(f"{srv.ws_url}/ws/jobs/stalled")
        try:
            await wait_until(
                lambda: srv.services.hub.subscribers("jobwire:{stalled}:live") == 2, what="both readers"
            )
            # 300 KB of transitions (never coalesced): past what the socket buffers hold,
            # well under the 1 MiB queue limit, so the time limit is what closes them.
            for step in range(150):
                await asyncio.to_thread(
                    recorder.record, "stalled", f"S{step % 2}", progress={"pad": "x" * 2000}
                )
            closed = srv.services.metrics.slow_closed.labels("websocket")
            started = time.monotonic()
            await wait_until(
                lambda: closed._value.get() == 2,
                what="jobwire closes both stalled readers",
                timeout=settings.stall_timeout + 10,
            )
            decided = time.monotonic()
            assert server_end(_port(srv), silent.port) == "ESTABLISHED"  # until cut off
            close = await waking.read_until_close()
            assert close is not None and close.code == 1013, close
            assert "too slow" in close.reason and "accepted nothing" in close.reason
            await wait_until(
                lambda: server_end(_port(srv), silent.port) is None,
                what="the server's end of the silent reader's connection is gone",
                timeout=5,
            )
            gone = time.monotonic()
        finally:
            silent.close()
            waking.close()
    assert decided - started <= settings.stall_timeout + 2
    assert gone - decided < 4, f"the server's socket outlived the close by {gone - decided:.1f}s"


async def test_quiet_stalled_reader_is_closed_1013_before_the_ping_timeout(own_redis: RedisServer) -> None:
    """A reader that stops reading on a stream with nothing to send blocks no send; only
    its unanswered keepalive ping shows it. jobwire counts that as accepting nothing and
    closes it 1013 at its stall timeout, before uvicorn's ping timeout would (1011)."""
    settings = settings_for(own_redis.url, stall_timeout=2.0)
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    recorder.record("quiet", "PENDING")
    async with run_server(settings, ping_interval=0.5) as srv:
        assert srv.server.config.ws_ping_timeout > settings.stall_timeout + 2  # chosen together
        reader = await RawReader.open(f"{srv.ws_url}/ws/jobs/quiet")
        try:
            closed = srv.services.metrics.slow_closed.labels("websocket")
            await wait_until(
                lambda: closed._value.get() == 1, what="jobwire closes the quiet reader", timeout=6
            )
            close = await reader.read_until_close()
            assert close is not None and close.code == 1013, close
            assert "answered no ping" in close.reason
            await wait_until(
                lambda: server_end(_port(srv), reader.port) is None,
                what="the server's end of the connection is gone",
                timeout=5,
            )
        finally:
            reader.close()


async def test_stalled_sse_reader_is_cut_off_and_its_socket_is_gone(own_redis: RedisServer) -> None:
    """An SSE reader that stops reading: its stream's writer blocks in a send for good, so
    when the policy gives up on it (here its queue passes the byte limit) the connection is
    reset, counted, and the server's socket is gone within seconds."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    recorder.record("stalled-sse", "PENDING")
    async with run_server(settings) as srv:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", _port(srv)))
            await loop.sock_sendall(sock, b"GET /api/v1/jobs/stalled-sse/events HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await loop.sock_recv(sock, 12)).startswith(b"HTTP/1.1 200")
            await wait_until(
                lambda: srv.services.hub.subscribers("jobwire:{stalled-sse}:live") == 1, what="the reader"
            )
            # 6 MB of transitions: past what the kernel buffers, and past the 1 MiB queue.
            closed = srv.services.metrics.slow_closed.labels("sse")
            pad = {"pad": "x" * 2000}
            for batch in range(30):
                steps = range(batch * 100, batch * 100 + 100)
                await asyncio.to_thread(_record_many, recorder, "stalled-sse", steps, pad)
                if closed._value.get():
                    break
            await wait_until(
                lambda: closed._value.get() == 1 and server_end(_port(srv), sock.getsockname()[1]) is None,
                what="the stalled stream is cut off, and counted",
                timeout=5,
            )
        finally:
            sock.close()


def _record_many(recorder: Recorder, job_id: str, steps: range, progress: dict[str, str]) -> None:
    with recorder.client.pipeline(transaction=False) as pipe:
        for step in steps:
            recorder.record(job_id, f"S{step % 2}", progress=progress, pipe=pipe)
        pipe.execute()
