"""A minimal websocket client for the load generator: the opening handshake, then server
frames split by hand and handed over as text.

Why: the `websockets` client costs the load generator about 20 µs of Python per frame, so
at 50,000 frames/s it saturated a core before any server did, and what was measured was
the client. This one does the least a reader can: find frame boundaries (a server's frames
are not masked), answer pings, and pass each text payload to a callback. It sends only a
few small masked frames (subscribe messages), so masking byte by byte is fine.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Callable
from typing import Any


class RawWS(asyncio.Protocol):
    """One client connection. Until `on_text` is set, text frames wait in `inbox` (and
    `recv` raises once the connection is gone, with the server's close code if it sent one)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the connection ended
        self.on_text: Callable[[bytes], None] | None = None
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self.close_code: int | None = None
        self.close_reason = ""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the handshake ({exc or 'EOF'})"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.inbox.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self.opened.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:12])
            del buf[: end + 4]
            if status != b"HTTP/1.1 101":
                self.opened.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                return
            self.opened.set_result(None)
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 1:
                if self.on_text is not None:
                    self.on_text(payload)
                else:
                    self.inbox.put_nowait(payload)
            elif opcode == 9:
                self._send(0xA, payload)  # pong
            elif opcode == 8 and self.transport is not None:
                if len(payload) >= 2:
                    self.close_code = int.from_bytes(payload[:2], "big")
                    self.close_reason = payload[2:].decode(errors="replace")
                self.transport.close()
        del buf[:pos]

    # -- use ----------------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode())

    async def recv(self) -> bytes:
        frame = await self.inbox.get()
        if frame is None:
            self.inbox.put_nowait(None)  # for the next caller too
            raise ConnectionError(f"connection closed ({self.close_code} {self.close_reason!r})")
        return frame

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _send(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        n = len(payload)
        head = bytes((0x80 | opcode,)) + (
            bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + n.to_bytes(2, "big")
        )
        mask = os.urandom(4)
        self.transport.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


async def connect(port: int, path: str, *, sock: socket.socket | None = None) -> RawWS:
    """Open `ws://127.0.0.1:<port><path>` (on `sock`, if given: a stalled client's)."""
    loop = asyncio.get_running_loop()
    kw: dict[str, Any] = {"sock": sock} if sock is not None else {"host": "127.0.0.1", "port": port}
    _, ws = await loop.create_connection(RawWS, **kw)
    key = base64.b64encode(os.urandom(16)).decode()
    assert ws.transport is not None
    ws.transport.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await asyncio.wait_for(ws.opened, 10)
    return ws
