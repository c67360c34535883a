"""Frames written straight from the hub's dispatch (`server.direct`) keep every guarantee:
a client keeping up gets its events that way, in order and gap-free, mixed with what the
socket's writer sends (replies, replayed history), and a final event still closes
`/ws/jobs/{id}`.

And they fail safe: the installed uvicorn is pinned to have every attribute the direct
path reads (an upgrade that renames one fails here, loudly), and a uvicorn whose
internals differ gets the ASGI path, with one warning saying what was missing."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import socket
import tomllib
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import websockets
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from jobwire.server import direct, transports
from jobwire.server.direct import frame_writer
from jobwire.server.events import ws_frame
from jobwire.server.metrics import Tally
from jobwire.server.routes import sse as sse_routes
from jobwire.tasks.recorder import Recorder
from tests.clients import assert_gap_free, next_of, recv_json, until_subscribed
from tests.support import ROOT, RedisServer, run_server, settings_for


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_a_client_keeping_up_gets_frames_written_directly(own_redis: RedisServer) -> None:
    """Live events go straight to the socket, interleaved with the writer's replies and
    replayed history, in order; the single-job socket still closes after the final event."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("direct", "PENDING")
    recorder.record("direct", "STARTED")  # both replayed from history, through the writer
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        async with (
            websockets.connect(f"{srv.ws_url}/ws") as ws,
            websockets.connect(
                f"{srv.ws_url}/ws/jobs/direct",
                max_queue=None,  # read only at the end, and lose no frame
            ) as single,
        ):
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ["direct"]}))
            replayed = await until_subscribed(ws, "direct")
            # A dashboard: its all-jobs events take the feed's general path, not the fast one.
            dashboard = await websockets.connect(f"{srv.ws_url}/ws", max_queue=None)
            await dashboard.send(json.dumps({"op": "subscribe_all"}))
            while (await recv_json(dashboard, 10))["type"] != "subscribed_all":
                pass

            async def emit() -> None:
                for i in range(300):
                    # In a thread: the server dispatches each event while the next is written.
                    await asyncio.to_thread(recorder.record, "direct", "WORKING", progress={"i": i})
                    if i % 50 == 0:
                        await ws.send(json.dumps({"op": "ping"}))  # replies interleave with events
                await asyncio.to_thread(recorder.record, "direct", "SUCCESS", result=300)

            emitting = asyncio.create_task(emit())
            events, other = list(replayed), []
            while not (events and events[-1]["final"]):
                msg = await recv_json(ws, 20)
                (events if msg["type"] == "event" else other).append(msg)
            await emitting
            dashboard_other = []
            while True:
                msg = await recv_json(dashboard, 20)
                if msg["type"] != "event":
                    dashboard_other.append(msg["type"])
                elif msg["final"]:
                    break
            await dashboard.close()
            single_events = [json.loads(m) async for m in single]
            assert single.close_code == 1000  # the final event still closes the single-job socket
        text = (await http.get("/metrics")).text

    # Only the six pongs: a frame written directly does not wake the socket's writer
    # (which, finding nothing to send, took the wake for idleness and sent a heartbeat).
    assert [m["type"] for m in other] == ["pong"] * 6
    assert dashboard_other == []
    streams = (events, [e for e in single_events if e.get("type") == "event"])
    for got in streams:
        # In order and gap-free. A reader that falls behind (this test's client shares its
        # event loop with the server and the emitter) gets progress coalesced, as it should.
        assert_gap_free(got)
        assert got[-1]["seq"] == 303 and got[-1]["state"] == "SUCCESS" and got[-1]["result"] == 300
    direct = _metric(text, "jobwire_direct_writes_total")
    delivered = _metric(text, 'jobwire_deliveries_total{transport="websocket"}')
    assert delivered >= sum(map(len, streams))  # and the dashboard's
    # Live progress goes direct; the replayed history, and the final event of the
    # single-job socket, go through the writer (and anything queued while a reader lagged).
    assert direct >= delivered / 2, f"only {direct} of {delivered} deliveries were written directly"


async def test_a_socket_of_another_server_is_not_written_directly() -> None:
    """Only uvicorn's websockets-sansio protocol is known: anything else gets the ASGI path."""

    async def send(message: dict[str, object]) -> None:  # an ASGI send of some other server
        pass

    assert frame_writer(send, Tally()) is None


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70001])
def test_ready_made_frames_are_what_websockets_would_send(length: int) -> None:
    """Every length encoding of RFC 6455 (7, 16 and 64 bits), with multi-byte characters."""
    text = "é" * (length // 2) + "a" * (length % 2)
    assert ws_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


async def test_direct_writes_skip_nothing_and_repeat_nothing(own_redis: RedisServer) -> None:
    """A live event that repeats one already sent, or jumps past one never seen, is not
    written directly: the duplicate is dropped, the jump is checked against history."""
    settings = settings_for(own_redis.url)
    client = own_redis.client()
    recorder = Recorder(client, settings)
    recorder.record("strict", "PENDING")
    recorder.record("strict", "STARTED")
    async with run_server(settings) as srv, websockets.connect(f"{srv.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["strict"]}))
        events = await until_subscribed(ws, "strict")
        second = orjson.loads(client.zrange(settings.keys.history("strict"), 1, 1)[0])
        channel = settings.keys.job_channel("strict")
        client.publish(channel, orjson.dumps(second))  # seq 2 again
        client.publish(channel, orjson.dumps({**second, "seq": 5}))  # seq 5, never recorded
        recorder.record("strict", "SUCCESS", result="ok")  # seq 3
        while not events[-1]["final"]:
            msg = await recv_json(ws, 10)
            if msg["type"] == "event":
                events.append(msg)
    assert [e["seq"] for e in events] == [1, 2, 3]


# -- failing safe: what is read from uvicorn, pinned to the installed one -------------------

#: Every attribute `server.direct` reads, by dotted path from uvicorn's websocket protocol
#: (the object behind the raw ASGI send) and from an HTTP request's transport. Written out
#: here, not taken from the module, so that a new need must be pinned too.
PINNED_WEBSOCKET = {
    "transport.write",
    "transport.is_closing",
    "transport.get_extra_info",
    "transport.abort",
    "writable",
    "writable.is_set",
    "pause_writing",
    "close_sent",
    "conn.extensions",
    "pending_ping_payload",
    "ping_sent_at",
    "handshake_complete",
}
PINNED_TRANSPORT = {"get_extra_info", "abort"}
WARNINGS = "jobwire.server.direct"


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every protocol class probed afresh, and the once-per-process warnings unsaid."""
    monkeypatch.setattr(direct, "_websocket_classes", {})
    monkeypatch.setattr(direct, "_transport_classes", {})
    monkeypatch.setattr(direct, "_warned", set())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WARNINGS and r.levelno >= logging.WARNING]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _assigned(cls: type) -> set[str]:
    """The names `cls`'s methods assign as `self.<name> = ...` (or `self.<name>: T = ...`).
    Method by method: `inspect.getsource` of a class parses its module, which trips a
    CPython 3.11.7 bug under pytest ("AST constructor recursion depth mismatch")."""
    source = "".join(inspect.getsource(f) for f in vars(cls).values() if inspect.isfunction(f))
    return set(re.findall(r"\bself\.(\w+)\s*(?::[^=\n]+)?=(?!=)", source))


def test_the_installed_uvicorn_is_inside_the_bound_and_the_bound_has_a_ceiling() -> None:
    """A new uvicorn is tried (this file) before pyproject lets it in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [requirement] = [d for d in project["dependencies"] if re.match(r"uvicorn\b", d)]
    bounds = {op: _version(v) for op, v in re.findall(r"(>=|<)\s*([\d.]+)", requirement)}
    assert "<" in bounds, f"uvicorn needs an upper bound: {requirement}"
    assert bounds[">="] <= _version(uvicorn.__version__) < bounds["<"], (uvicorn.__version__, requirement)


def test_uvicorn_classes_have_what_direct_reads() -> None:
    """By introspection, with no connection: the classes, and the attributes they set."""
    needs = {path for paths in direct.WEBSOCKET_NEEDS.values() for path in paths}
    assert needs == PINNED_WEBSOCKET, "pin what server.direct now reads (and check it below)"
    assert set(direct.TRANSPORT_NEEDS) == PINNED_TRANSPORT
    # uvicorn's default websocket protocol (jobwire leaves `ws` at "auto") is the one known
    assert direct.WebSocketsSansIOProtocol is WebSocketsSansIOProtocol
    assert AutoWebSocketsProtocol is WebSocketsSansIOProtocol
    assert {"transport", "writable", "close_sent", "conn", "pending_ping_payload", "ping_sent_at"} | {
        "handshake_complete"
    } <= _assigned(WebSocketsSansIOProtocol)
    # its flow control is what clears `writable` (asyncio.Protocol's does nothing)
    for name in ("pause_writing", "resume_writing", "connection_lost"):
        assert name in vars(WebSocketsSansIOProtocol), name
    assert "self.writable.clear()" in inspect.getsource(WebSocketsSansIOProtocol.pause_writing)
    assert inspect.iscoroutinefunction(WebSocketsSansIOProtocol.send)  # found as `send.__self__`
    assert ServerProtocol().extensions == []  # `conn`: websockets' protocol
    assert callable(asyncio.Event().is_set)
    # server.heads' HttpProtocol (which leaves the transport in the scope) overrides these
    for name in (
        "data_received",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "send_400_response",
        "handle_websocket_upgrade",
    ):
        assert callable(getattr(HttpToolsProtocol, name, None)), name
    assert {"transport", "scope"} <= _assigned(HttpToolsProtocol)


async def test_a_real_uvicorn_connection_has_everything_direct_reads(
    own_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fresh_probe: None,
) -> None:
    """Through a real server: the objects behind a websocket's send and an SSE request's
    transport have every attribute, of the type expected, and every feature is on."""
    seen: dict[str, Any] = {}
    real_frame_writer, real_cut_off = transports.frame_writer, sse_routes.cut_off_when_too_slow

    def frame_writer_spy(send: Any, written: Tally) -> Any:
        seen["send"], seen["write"] = send, real_frame_writer(send, written)
        return seen["write"]

    def cut_off_spy(scope: dict[str, Any], delay: float) -> Any:
        seen["transport"] = transport = scope.get(direct.TRANSPORT)
        seen["sse socket"] = transport.get_extra_info("socket") if transport is not None else None
        seen["too slow"] = real_cut_off(scope, delay)
        return seen["too slow"]

    monkeypatch.setattr(transports, "frame_writer", frame_writer_spy)
    monkeypatch.setattr(sse_routes, "cut_off_when_too_slow", cut_off_spy)
    caplog.set_level(logging.DEBUG, logger=WARNINGS)
    # uvicorn's own protocol, the fallback (jobwire's own: tests/test_lean_ws.py)
    settings = settings_for(own_redis.url, ws_protocol="uvicorn")
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("pinned", "PENDING")
    recorder.record("pinned", "SUCCESS", result=1)
    async with run_server(settings) as srv, websockets.connect(f"{srv.ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["pinned"]}))
        await until_subscribed(ws, "pinned")
        send = seen["send"]
        proto = send.__self__
        assert type(proto) is srv.server.config.ws_protocol_class  # uvicorn's, as jobwire configures it
        assert isinstance(proto, WebSocketsSansIOProtocol)
        # Each attribute, by name: a rename in uvicorn (or websockets) fails here.
        transport = proto.transport
        for method in ("write", "is_closing", "get_extra_info", "abort"):
            assert callable(getattr(transport, method)), method
        assert isinstance(proto.writable, asyncio.Event) and proto.writable.is_set()
        assert proto.close_sent is False
        assert proto.conn.extensions == []  # no per-message deflate
        assert proto.handshake_complete is True
        assert proto.pending_ping_payload is None or isinstance(proto.pending_ping_payload, bytes)
        assert isinstance(proto.ping_sent_at, float)
        sock = transport.get_extra_info("socket")
        # bound_kernel_buffer took (Linux reports twice what was set, for its bookkeeping)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) in (
            settings.socket_send_buffer,
            2 * settings.socket_send_buffer,
        )
        # The semantics relied on: uvicorn's flow control clears `writable`, and a paused
        # socket is not written directly.
        write = seen["write"]
        assert write is not None
        proto.pause_writing()
        assert not proto.writable.is_set() and write(b"", 0) is False
        proto.resume_writing()
        assert proto.writable.is_set() and write(b"", 0) is True
        since = direct.ping_waiting_since(send)
        assert since is not None and since() in (None, proto.ping_sent_at)
        # and the probe agrees: nothing missing, every feature on
        assert (
            direct.problems(proto, {k: v for f in direct.WEBSOCKET_NEEDS.values() for k, v in f.items()})
            == {}
        )
        assert direct._websocket_classes[type(proto)] == frozenset(direct.WEBSOCKET_NEEDS)

        async with httpx.AsyncClient(base_url=srv.url) as http:
            response = await http.get("/api/v1/jobs/pinned/events")
        assert response.status_code == 200 and "SUCCESS" in response.text
    assert seen["transport"] is not None and seen["sse socket"] is not None
    assert direct.problems(seen["transport"], direct.TRANSPORT_NEEDS) == {}
    assert seen["too slow"] is not None
    assert _warnings(caplog) == []


# -- failing safe: uvicorn's internals changed ----------------------------------------------


class _ConnWithoutExtensions:
    """websockets' ServerProtocol as a later release might have it: `extensions` renamed."""

    def __init__(self, conn: ServerProtocol) -> None:
        self.__dict__["_conn"] = conn

    def __getattr__(self, name: str) -> Any:
        if name == "extensions":
            raise AttributeError(name)
        return getattr(self._conn, name)


class ExtensionsRenamed(WebSocketsSansIOProtocol):
    """uvicorn's protocol, working, but not as the probe expects (`conn.extensions`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _ConnWithoutExtensions(self.conn)  # type: ignore[assignment]


class _Flag(asyncio.Event):
    """An Event that uvicorn still uses (`wait`, `set`, `clear`), but whose `is_set` fails."""

    def is_set(self) -> bool:
        raise AttributeError("'_Flag' object has no attribute '_value'")


class WritesFail(WebSocketsSansIOProtocol):
    """Passes the probe; every direct write then fails (AttributeError at write time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writable = _Flag()
        self.writable.set()


@pytest.mark.parametrize(
    ("protocol", "warning"),
    [
        (WebSocketsSansIOProtocol, None),  # the control: direct writes happen
        (ExtensionsRenamed, "conn.extensions missing"),
        (WritesFail, "a direct write failed"),
    ],
    ids=["as-expected", "probe-fails", "write-fails"],
)
async def test_changed_internals_take_the_asgi_path_with_one_warning(
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    fresh_probe: None,
    protocol: type[WebSocketsSansIOProtocol],
    warning: str | None,
) -> None:
    """Two sockets on a uvicorn whose internals differ: every event still arrives (through
    the ASGI path), none is written directly, and one warning names the trouble and the
    installed uvicorn."""
    caplog.set_level(logging.DEBUG, logger=WARNINGS)
    settings = settings_for(own_redis.url)
    recorder = Recorder(own_redis.client(), settings)
    recorder.record("changed", "PENDING")
    async with (
        run_server(settings, ws=protocol) as srv,
        httpx.AsyncClient(base_url=srv.url) as http,
        websockets.connect(f"{srv.ws_url}/ws") as first,
        websockets.connect(f"{srv.ws_url}/ws") as second,
    ):
        sockets = (first, second)
        got: list[list[dict[str, Any]]] = []
        for ws in sockets:
            await ws.send(json.dumps({"op": "subscribe", "job_ids": ["changed"]}))
            got.append(await until_subscribed(ws, "changed"))
        for i in range(30):  # one at a time: each could be written directly
            await asyncio.to_thread(recorder.record, "changed", "WORKING", progress={"i": i})
            for ws, events in zip(sockets, got, strict=True):
                events.append(await next_of(ws, "event"))
        await asyncio.to_thread(recorder.record, "changed", "SUCCESS", result="ok")
        for ws, events in zip(sockets, got, strict=True):
            events.append(await next_of(ws, "event"))
        text = (await http.get("/metrics")).text

    for events in got:  # every event, none coalesced or lost
        assert [e["seq"] for e in events] == list(range(1, 33))
        assert not any(e.get("coalesced") for e in events) and events[-1]["state"] == "SUCCESS"
    direct_writes = _metric(text, "jobwire_direct_writes_total")
    said = _warnings(caplog)
    if warning is None:
        assert direct_writes > 0 and said == []
    else:
        assert direct_writes == 0
        assert len(said) == 1, said
        assert warning in said[0] and f"uvicorn {uvicorn.__version__}" in said[0], said[0]


# -- failing safe, piece by piece --------------------------------------------------------------


class _Transport:
    """What a websocket's transport offers, recording what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def abort(self) -> None:
        self.closing = True


class _Bare(WebSocketsSansIOProtocol):
    """uvicorn's protocol class, its instances built by hand (no connection)."""


def _protocol(**attributes: Any) -> _Bare:
    proto = object.__new__(_Bare)
    writable = asyncio.Event()
    writable.set()
    defaults = dict(
        transport=_Transport(),
        writable=writable,
        close_sent=False,
        conn=ServerProtocol(),
        pending_ping_payload=None,
        ping_sent_at=0.0,
        handshake_complete=False,
    )
    vars(proto).update({**defaults, **attributes})
    return proto


async def test_a_protocol_with_none_of_it_turns_everything_off_and_says_so_once(
    caplog: pytest.LogCaptureFixture, fresh_probe: None
) -> None:
    caplog.set_level(logging.DEBUG, logger=WARNINGS)
    for _ in range(2):
        proto = object.__new__(_Bare)  # no attribute set at all
        send = proto.send
        assert frame_writer(send, Tally()) is None
        assert direct.ping_waiting_since(send) is None
        direct.bound_kernel_buffer(send, 65536)
        direct.cut_off_later(send, 0.01)
        direct.denial_sent(send)
        assert "handshake_complete" not in vars(proto)
    [said] = _warnings(caplog)
    assert f"uvicorn {uvicorn.__version__}" in said
    for path in PINNED_WEBSOCKET - {"pause_writing", "writable.is_set"}:  # those two are methods
        assert f"{path} missing" in said, path
    assert "Turned off: direct writes, ping tracking" in said


async def test_an_unexpected_type_is_as_good_as_missing(
    caplog: pytest.LogCaptureFixture, fresh_probe: None
) -> None:
    caplog.set_level(logging.DEBUG, logger=WARNINGS)
    proto = _protocol(writable=True, ping_sent_at=None)  # a bool flag; no float
    assert frame_writer(proto.send, Tally()) is None
    assert direct.ping_waiting_since(proto.send) is None
    direct.denial_sent(proto.send)
    assert proto.handshake_complete is True  # what the class still has works
    [said] = _warnings(caplog)
    assert "writable a bool, expected Event" in said and "ping_sent_at a NoneType, expected float" in said


async def test_what_changes_after_the_probe_falls_back_at_use(
    caplog: pytest.LogCaptureFixture, fresh_probe: None
) -> None:
    """The fast path as it was while the internals hold; an AttributeError or TypeError at
    write (or ping) time is the ASGI path (no ping tracking), never an exception."""
    caplog.set_level(logging.DEBUG, logger=WARNINGS)
    proto = _protocol()
    written = Tally()
    write = frame_writer(proto.send, written)
    assert write is not None
    assert write(b"ab", 2) is True and proto.transport.written == [b"ab"] and written.n == 2
    proto.writable.clear()
    assert write(b"c", 1) is False  # over the high-water mark
    proto.writable.set()
    proto.close_sent = True
    assert write(b"c", 1) is False  # closed by us
    proto.close_sent = False
    proto.transport.closing = True
    assert write(b"c", 1) is False  # closed by the client
    proto.transport.closing = False
    assert _warnings(caplog) == []

    del proto.close_sent  # an internal gone after the probe
    assert write(b"c", 1) is False
    proto.close_sent = False
    assert write(b"c", 1) is False  # that socket stays on the ASGI path
    assert proto.transport.written == [b"ab"] and written.n == 2

    since = direct.ping_waiting_since(proto.send)
    assert since is not None and since() is None
    proto.pending_ping_payload, proto.ping_sent_at = b"ping", 12.5
    assert since() == 12.5
    del proto.pending_ping_payload
    assert since() is None

    proto.transport.get_extra_info = None  # type: ignore[method-assign]
    direct.bound_kernel_buffer(proto.send, 65536)  # TypeError: not called, not raised

    said = _warnings(caplog)
    assert len(said) == 3, said  # one each: the write, the ping state, the buffer bound
    assert "close_sent" in said[0] and "ASGI path" in said[0]


async def test_an_sse_transport_not_as_expected_is_not_cut_off(
    caplog: pytest.LogCaptureFixture, fresh_probe: None
) -> None:
    caplog.set_level(logging.DEBUG, logger=WARNINGS)

    class NoAbort:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    for _ in range(2):
        assert direct.cut_off_when_too_slow({direct.TRANSPORT: NoAbort()}, 0.01) is None
    assert direct.cut_off_when_too_slow({}, 0.01) is None  # another server: quietly none
    [said] = _warnings(caplog)
    assert "abort missing" in said and f"uvicorn {uvicorn.__version__}" in said

    class Broken(_Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            raise TypeError("changed signature")

    too_slow = direct.cut_off_when_too_slow({direct.TRANSPORT: Broken()}, 0.0)
    assert too_slow is not None
    too_slow("stalled")
    await asyncio.sleep(0.05)  # the cut-off ran, and raised nothing into the loop
    assert len(_warnings(caplog)) == 2
