"""Writing an event's websocket frame straight to the socket, from the hub's dispatch.

Why: at fan-out rates a delivery is mostly machinery around one `transport.write`: waking
the socket's writer task, the ASGI send with Starlette's wrappers around it, and
websockets encoding the same frame again for every watcher. A server's frames are not
masked, so an event's frame is the same bytes for every client: `Delivery.ws_frame` is
built once per event, and written as is to each socket that can take it at once.

This needs jobwire's own websocket protocol (`server.lean_ws`, what `jobwire serve` runs)
or uvicorn's websockets-sansio protocol (uvicorn's default when `websockets` is
installed), without compression; it is found through the raw ASGI `send`, which
`RawSend` keeps in the scope. Elsewhere, and whenever a socket is not open and writable
(its buffer is full: a slow reader), the feed queues the event and the socket's writer
sends it through ASGI as before. The feed writes directly only when nothing of its own
waits or is being sent, so the order holds (see `Feed`).

Failing safe. `LeanWebSocket` has every attribute listed below by design (its tests say
so). Everything read here from uvicorn (and websockets) is private, and listed
in `WEBSOCKET_NEEDS` and `TRANSPORT_NEEDS`. Each protocol (or transport) class is
probed once, on its first connection: every listed attribute must be there with the
expected type. A feature whose needs are not all met is off for that class (direct
writes: the ASGI path; ping tracking: `StallWatch` sees only blocked sends; the kernel
buffer bound and cutting off: not done), and one WARNING per process says what was
missing and which uvicorn is installed. Anything that still fails later (AttributeError,
TypeError) turns the feature off for that connection, with one WARNING too: nothing
raises into a connection or the hub's dispatch because uvicorn changed. When the
internals are as expected, a connection pays one dict lookup per call here, and a
direct write costs what it did (`tests/test_direct_writes.py` pins the installed
uvicorn's attributes; pyproject bounds uvicorn).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from starlette.websockets import WebSocket

from jobwire.server.metrics import Tally

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError as exc:  # pragma: no cover - another server or another uvicorn: ASGI only
    WebSocketsSansIOProtocol = None  # type: ignore[assignment,misc]
    _SANSIO_MISSING = f"websockets_sansio_impl.WebSocketsSansIOProtocol not importable ({exc})"
else:
    _SANSIO_MISSING = ""
try:  # jobwire's own protocol (`jobwire serve`'s default), built to have what is read here
    from jobwire.server.lean_ws import LeanWebSocket, Writable
except ImportError:  # pragma: no cover - no uvicorn, or one without what it imports
    LeanWebSocket = Writable = None  # type: ignore[assignment,misc]

#: The protocol classes whose objects are probed; any other server's send is the ASGI path.
KNOWN_PROTOCOLS: tuple[type, ...] = tuple(
    cls for cls in (LeanWebSocket, WebSocketsSansIOProtocol) if cls is not None
)

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
RAW_SEND = "jobwire.raw_send"  # the scope key
WRAPPED = "jobwire.wrapped"  # in the scope when something of a host's wraps the server's send
TRANSPORT = "jobwire.transport"  # an HTTP request's transport, left in its scope by server.heads
CLOSE_GRACE = 2.0  # seconds a client closed by jobwire has to take what is due before it is cut off

# -- what is read from uvicorn, and the probe ---------------------------------------------

Check = tuple[str, Callable[[Any], bool]]  # what is expected (for the warning), and the test


def _a(*types: type) -> Check:
    """An instance of one of `types`."""
    expected = " or ".join("None" if t is type(None) else t.__name__ for t in types)
    return expected, lambda value: isinstance(value, types)


def _flow_control(method: Any) -> bool:
    """uvicorn's own `pause_writing`, which clears `writable` (asyncio.Protocol's does nothing)."""
    return callable(method) and getattr(method, "__func__", None) is not asyncio.BaseProtocol.pause_writing


CALLABLE: Check = ("callable", callable)
DIRECT_WRITES = "direct writes"
PING_TRACKING = "ping tracking"
BUFFER_BOUND = "kernel send buffer bound"
CUT_OFF = "cutting off"
DENIAL_FIX = "denial handshake fix"

#: What jobwire reads from the websocket's protocol, `LeanWebSocket` or uvicorn's
#: websockets-sansio (the object behind a websocket's raw ASGI send, `send.__self__`), by
#: feature: dotted attribute paths on it.
WEBSOCKET_NEEDS: dict[str, dict[str, Check]] = {
    DIRECT_WRITES: {
        "transport.write": CALLABLE,
        "transport.is_closing": CALLABLE,
        # cleared while the transport's buffer is over its mark (lean_ws: a lighter flag)
        "writable": _a(*(t for t in (asyncio.Event, Writable) if t is not None)),
        "writable.is_set": CALLABLE,
        "pause_writing": ("uvicorn's flow control (clears writable)", _flow_control),
        "close_sent": _a(bool),  # set by every close of ours
        "conn.extensions": _a(list),  # websockets' negotiated extensions: deflate means no
    },
    PING_TRACKING: {
        "pending_ping_payload": _a(bytes, type(None)),  # None while no pong is awaited
        "ping_sent_at": _a(float),  # loop time of the last keepalive ping
    },
    BUFFER_BOUND: {"transport.get_extra_info": CALLABLE},
    CUT_OFF: {"transport.get_extra_info": CALLABLE, "transport.abort": CALLABLE},
    DENIAL_FIX: {"handshake_complete": _a(bool)},
}
#: What jobwire reads from an HTTP request's transport (`TRANSPORT`, left in the scope by
#: `server.heads.HttpProtocol` from uvicorn's httptools protocol) to cut off an SSE stream.
TRANSPORT_NEEDS: dict[str, Check] = {"get_extra_info": CALLABLE, "abort": CALLABLE}

_NOTHING: frozenset[str] = frozenset()
_websocket_classes: dict[type, frozenset[str]] = {}  # protocol class: its features that work
_transport_classes: dict[type, bool] = {}  # transport class: can be cut off
_warned: set[str] = set()  # what has had its one warning in this process


def _uvicorn_version() -> str:
    try:
        import uvicorn

        return str(uvicorn.__version__)
    except Exception:  # pragma: no cover
        return "not installed"


def _warn_once(what: str, message: str, *args: object) -> None:
    """One WARNING per process for each kind of trouble (`what`); later ones at DEBUG."""
    if what in _warned:
        log.debug(message, *args)
        return
    _warned.add(what)
    log.warning(message + " [uvicorn %s; logged once]", *args, _uvicorn_version())


def _resolve(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def problems(obj: Any, needs: dict[str, Check]) -> dict[str, str]:
    """What in `needs` `obj` lacks or has of another type: {path: what is wrong}."""
    found: dict[str, str] = {}
    for path, (expected, test) in needs.items():
        try:
            value = _resolve(obj, path)
        except AttributeError:
            found[path] = "missing"
            continue
        except Exception as exc:  # a property that raised: as good as missing
            found[path] = f"raised {exc!r}"
            continue
        try:
            ok = test(value)
        except Exception:  # pragma: no cover - the tests are isinstance and callable
            ok = False
        if not ok:
            found[path] = f"a {type(value).__name__}, expected {expected}"
    return found


def _probe(proto: Any) -> frozenset[str]:
    """The features of `WEBSOCKET_NEEDS` that `proto`'s class supports, warning once about
    those it does not. Run once per protocol class, on its first connection."""
    cls = type(proto)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(proto, KNOWN_PROTOCOLS):
        if cls.__module__.startswith("uvicorn."):  # another server's send stays quiet
            _warn_once(
                "websocket",
                "server.direct: this websocket's protocol is %s, neither jobwire's nor uvicorn's "
                "websockets-sansio%s: "
                "websockets take the ASGI path (no direct writes, no ping tracking)",
                name,
                f" ({_SANSIO_MISSING})" if _SANSIO_MISSING else "",
            )
        return _NOTHING
    every: dict[str, Check] = {}
    for needs in WEBSOCKET_NEEDS.values():
        every.update(needs)
    wrong = problems(proto, every)
    features = frozenset(f for f, needs in WEBSOCKET_NEEDS.items() if not needs.keys() & wrong.keys())
    if wrong:
        _warn_once(
            "websocket",
            "server.direct: uvicorn's websocket protocol %s is not as expected: %s. Turned off: %s%s",
            name,
            "; ".join(f"{path} {why}" for path, why in wrong.items()),
            ", ".join(f for f in WEBSOCKET_NEEDS if f not in features),
            " (websockets take the ASGI path)" if DIRECT_WRITES not in features else "",
        )
    return features


def _gone(proto: Any) -> bool:
    """Whether the connection behind `proto` is closing or lost (its attributes may already
    be let go: a probe of it would turn features off for every later connection)."""
    try:
        return bool(proto.transport.is_closing())
    except Exception:
        return False


def _websocket(send: Send) -> tuple[Any, frozenset[str]]:
    """The protocol behind `send`, and the features its class supports (probed once)."""
    proto = getattr(send, "__self__", None)
    features = _websocket_classes.get(type(proto))
    if features is None:
        if _gone(proto):  # a connection already lost says nothing about its class: probe the next
            return proto, _NOTHING
        try:
            features = _probe(proto)
        except Exception as exc:  # pragma: no cover - the probe itself must not take a connection down
            _warn_once("websocket", "server.direct: probing %r failed (%r): ASGI path", proto, exc)
            features = _NOTHING
        _websocket_classes[type(proto)] = features
    return proto, features


# -- the websocket ------------------------------------------------------------------------


class RawSend:
    """ASGI middleware, outermost: keeps the server's own `send` in a websocket's scope,
    before Starlette wraps it (its wrappers only matter for HTTP responses).

    jobwire's app has it first; an app that mounts jobwire adds it too, outside its own
    middleware (`jobwire.mount()` does), and the outermost one wins: the host's wrappers
    of `send` would otherwise turn the direct writes off."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "websocket" and scope.setdefault(RAW_SEND, send) is not send:
            scope[WRAPPED] = True  # a host's middleware between the server and this app
        await self.app(scope, receive, send)


def raw_send(ws: WebSocket) -> Send:
    """The ASGI send with nothing in between (Starlette's, when the middleware is absent;
    its public `send` if even that is gone)."""
    return ws.scope.get(RAW_SEND) or getattr(ws, "_send", None) or ws.send  # type: ignore[no-any-return]


def detach(ws: WebSocket, session: Coroutine[Any, Any, None]) -> bool:
    """Hand `session` (the rest of an accepted websocket's handler) to jobwire's own
    protocol, to run past the ASGI call (see `LeanWebSocket.detach`); True if it took it.
    False under any other protocol, or where a host's middleware wraps jobwire's app
    (it may expect the call to last as long as the socket): then await `session`."""
    if ws.scope.get(WRAPPED) or LeanWebSocket is None:
        return False
    proto = getattr(ws.scope.get(RAW_SEND), "__self__", None)
    if not isinstance(proto, LeanWebSocket):
        return False
    proto.detach(session)
    return True


def bound_kernel_buffer(send: Send, size: int) -> None:
    """Cap the socket's kernel send buffer at `size` bytes (see `Settings.socket_send_buffer`)."""
    if not size:
        return
    proto, features = _websocket(send)
    if BUFFER_BOUND not in features:
        return
    try:
        sock = proto.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except (AttributeError, TypeError) as exc:
        _warn_once(BUFFER_BOUND, "server.direct: the kernel send buffer is not bounded: %r", exc)
    except OSError as exc:  # the socket, not uvicorn
        log.debug("SO_SNDBUF not set: %r", exc)


def cut_off_later(send: Send, delay: float) -> None:
    """In `delay` seconds, reset the connection behind `send` if it is still open: what the
    client has not taken (in uvicorn's buffer and the kernel's) is dropped and an RST
    sent, so the server's socket is gone at once, not lingering on a reader that never
    reads. Nothing happens to a connection that closed meanwhile."""
    proto, features = _websocket(send)
    if CUT_OFF in features:
        try:
            transport = proto.transport
        except AttributeError as exc:  # pragma: no cover - the probe saw it
            _warn_once(CUT_OFF, "server.direct: a websocket cannot be cut off: %r", exc)
            return
        asyncio.get_running_loop().call_later(delay, _cut_off, transport)


def denial_sent(send: Send) -> None:
    """Tell uvicorn's websockets-sansio protocol that the handshake is over once a denial
    response (`websocket.http.response`) is out: 0.54 does not, and logs "ASGI callable
    returned without completing handshake" at ERROR for every refusal (its wsproto
    protocol does; the fix is uvicorn's PR 3138)."""
    proto, features = _websocket(send)
    if DENIAL_FIX in features:
        try:
            proto.handshake_complete = True
        except (AttributeError, TypeError) as exc:  # pragma: no cover - slots, a read-only property
            _warn_once(DENIAL_FIX, "server.direct: the handshake flag cannot be set: %r", exc)


def ping_waiting_since(send: Send) -> Callable[[], float | None] | None:
    """A function saying since when (loop time) the socket behind `send` has waited for
    the pong to uvicorn's keepalive ping, None while none is awaited (or when that can no
    longer be read); None where the protocol does not tell (another server, another
    uvicorn protocol, or one not as expected)."""
    proto, features = _websocket(send)
    if PING_TRACKING not in features:
        return None
    if LeanWebSocket is not None and isinstance(proto, LeanWebSocket):
        return proto.ping_waiting_since  # a method: no closure per connection

    def since() -> float | None:
        try:
            at = proto.ping_sent_at if proto.pending_ping_payload is not None else None
        except AttributeError as exc:
            _warn_once(PING_TRACKING, "server.direct: uvicorn's ping state is gone (%r): not tracked", exc)
            return None
        return at if isinstance(at, float) else None

    return since


def _never() -> bool:
    return False


def frame_writer(send: Send, written: Tally) -> Callable[[bytes, int], bool] | None:
    """A function that writes ready-made frames (`n` of them, joined) to the socket behind
    `send`, counts them in `written`, and says whether it did; None when that socket
    cannot be written to directly (the ASGI path)."""
    proto, features = _websocket(send)
    if DIRECT_WRITES not in features:
        return None
    try:
        if proto.conn.extensions:  # per-message deflate: each socket compresses in its own context
            return None
        transport = proto.transport
        is_set, is_closing, transport_write = proto.writable.is_set, transport.is_closing, transport.write
    except (AttributeError, TypeError) as exc:  # pragma: no cover - the probe saw them
        _warn_once(DIRECT_WRITES, "server.direct: no direct writes: %r", exc)
        return None
    if LeanWebSocket is not None and isinstance(proto, LeanWebSocket):
        return functools.partial(proto.write_frames, written)  # its own: no closure per connection

    def write(frames: bytes, n: int = 1) -> bool:
        nonlocal is_set
        try:
            # `writable` is cleared while the transport's buffer is over its high-water
            # mark. Every way out of the OPEN state either sets `close_sent` (we closed) or
            # closes the transport (the client closed, a failed keepalive, a protocol error).
            if not is_set() or proto.close_sent or is_closing():
                return False
            transport_write(frames)
        except (AttributeError, TypeError) as exc:
            is_set = _never  # this socket's later frames take the ASGI path too
            _warn_once(
                "websocket write",
                "server.direct: a direct write failed (%r): the socket takes the ASGI path from now on",
                exc,
            )
            return False
        written.n += n
        return True

    return write


# -- an HTTP stream (SSE) -----------------------------------------------------------------


def cut_off_when_too_slow(scope: dict[str, Any], delay: float) -> Callable[[str], None] | None:
    """For a feed's `on_too_slow` on an HTTP stream (SSE): the stream's writer is blocked
    in a send to a client that reads nothing, and would stay blocked, so the connection is
    reset `delay` seconds later unless the client took what was waiting and the stream
    ended by then. None where the server left no transport in the scope (`TRANSPORT`), or
    one without what `TRANSPORT_NEEDS` lists."""
    transport = scope.get(TRANSPORT)
    if transport is None:
        return None
    ok = _transport_classes.get(type(transport))
    if ok is None:
        wrong = problems(transport, TRANSPORT_NEEDS)
        if wrong:
            _warn_once(
                "http",
                "server.direct: the HTTP transport %s is not as expected: %s. Turned off: cutting off "
                "stalled SSE streams",
                type(transport).__qualname__,
                "; ".join(f"{path} {why}" for path, why in wrong.items()),
            )
        ok = _transport_classes[type(transport)] = not wrong
    if not ok:
        return None

    def too_slow(reason: str) -> None:
        asyncio.get_running_loop().call_later(delay, _cut_off, transport)

    return too_slow


def _cut_off(transport: Any) -> None:
    try:
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
    except (AttributeError, TypeError) as exc:
        _warn_once(CUT_OFF, "server.direct: a connection could not be cut off: %r", exc)
