"""Writing an event's websocket frame straight to the socket, from the hub's dispatch.

Why: at fan-out rates a delivery is mostly machinery around one `transport.write`: waking
the socket's writer task, the ASGI send with Starlette's wrappers around it, and
websockets encoding the same frame again for every watcher. A server's frames are not
masked, so an event's frame is the same bytes for every client: `Delivery.ws_frame` is
built once per event, and written as is to each socket that can take it at once.

This needs uvicorn's websockets-sansio protocol (its default when `websockets` is
installed) without compression; it is found through the raw ASGI `send`, which
`RawSend` keeps in the scope. Elsewhere, and whenever a socket is not open and writable
(its buffer is full: a slow reader), the feed queues the event and the socket's writer
sends it through ASGI as before. The feed writes directly only when nothing of its own
waits or is being sent, so the order holds (see `Feed`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket

from jobwire.server.metrics import Tally

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover - another server or an older uvicorn: ASGI only
    WebSocketsSansIOProtocol = None  # type: ignore[assignment,misc]

Send = Callable[[dict[str, Any]], Awaitable[None]]
RAW_SEND = "jobwire.raw_send"  # the scope key
TRANSPORT = "jobwire.transport"  # an HTTP request's transport, left in its scope by server.heads
CLOSE_GRACE = 2.0  # seconds a client closed by jobwire has to take what is due before it is cut off


class RawSend:
    """ASGI middleware, outermost: keeps the server's own `send` in a websocket's scope,
    before Starlette wraps it (its wrappers only matter for HTTP responses)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


def raw_send(ws: WebSocket) -> Send:
    """The ASGI send with nothing in between (Starlette's, when the middleware is absent)."""
    return ws.scope.get(RAW_SEND) or ws._send  # type: ignore[no-any-return]


def bound_kernel_buffer(send: Send, size: int) -> None:
    """Cap the socket's kernel send buffer at `size` bytes (see `Settings.socket_send_buffer`)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if size and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def cut_off_later(send: Send, delay: float) -> None:
    """In `delay` seconds, reset the connection behind `send` if it is still open: what the
    client has not taken (in uvicorn's buffer and the kernel's) is dropped and an RST
    sent, so the server's socket is gone at once, not lingering on a reader that never
    reads. Nothing happens to a connection that closed meanwhile."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None:
        asyncio.get_running_loop().call_later(delay, _cut_off, transport)


def cut_off_when_too_slow(scope: dict[str, Any], delay: float) -> Callable[[str], None] | None:
    """For a feed's `on_too_slow` on an HTTP stream (SSE): the stream's writer is blocked
    in a send to a client that reads nothing, and would stay blocked, so the connection is
    reset `delay` seconds later unless the client took what was waiting and the stream
    ended by then. None where the server left no transport in the scope (`TRANSPORT`)."""
    transport = scope.get(TRANSPORT)
    if transport is None:
        return None

    def too_slow(reason: str) -> None:
        asyncio.get_running_loop().call_later(delay, _cut_off, transport)

    return too_slow


def _cut_off(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() == -1:
        return  # closed already
    try:
        # A zero linger makes the close a reset: the kernel drops its send buffer too,
        # instead of holding the socket until a reader that never reads takes it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    transport.abort()


def denial_sent(send: Send) -> None:
    """Tell uvicorn's websockets-sansio protocol that the handshake is over once a denial
    response (`websocket.http.response`) is out: 0.54 does not, and logs "ASGI callable
    returned without completing handshake" at ERROR for every refusal (its wsproto
    protocol does; the fix is uvicorn's PR 3138)."""
    proto = getattr(send, "__self__", None)
    if WebSocketsSansIOProtocol is not None and isinstance(proto, WebSocketsSansIOProtocol):
        proto.handshake_complete = True


def ping_waiting_since(send: Send) -> Callable[[], float | None] | None:
    """A function saying since when (loop time) the socket behind `send` has waited for
    the pong to uvicorn's keepalive ping, None while none is awaited; None where the
    protocol does not tell (another server, another uvicorn protocol)."""
    proto = getattr(send, "__self__", None)
    if (
        WebSocketsSansIOProtocol is None
        or not isinstance(proto, WebSocketsSansIOProtocol)
        or not hasattr(proto, "pending_ping_payload")
        or not hasattr(proto, "ping_sent_at")
    ):
        return None

    def since() -> float | None:
        return proto.ping_sent_at if proto.pending_ping_payload is not None else None

    return since


def frame_writer(send: Send, written: Tally) -> Callable[[bytes, int], bool] | None:
    """A function that writes ready-made frames (`n` of them, joined) to the socket behind
    `send`, counts them in `written`, and says whether it did; None when that socket
    cannot be written to directly."""
    proto = getattr(send, "__self__", None)
    if WebSocketsSansIOProtocol is None or not isinstance(proto, WebSocketsSansIOProtocol):
        return None
    conn, transport, writable = proto.conn, proto.transport, proto.writable
    if conn.extensions:  # per-message deflate: each socket compresses in its own context
        return None

    def write(frames: bytes, n: int = 1) -> bool:
        # `writable` is cleared while the transport's buffer is over its high-water mark.
        # Every way out of the OPEN state either sets `close_sent` (we closed) or closes
        # the transport (the client closed, a failed keepalive, a protocol error).
        if not writable.is_set() or proto.close_sent or transport.is_closing():
            return False
        transport.write(frames)
        written.n += n
        return True

    return write
