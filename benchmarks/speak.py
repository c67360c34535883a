"""What the load generator says to each server and reads back, and what every event carries.

Each peer has its own protocol (jobwire's subscribe message, the relay's channel path,
Socket.IO's handshake and rooms) but the same events: the publisher numbers each job's
events `n` = 0, 1, 2… and changes the state every `phase` events, so a client can count
what a progress server must never lose (transitions: the first event of each state, and the
final event) apart from progress, which a server may coalesce. jobwire says so in its
frames (`"coalesced": k` on the event that replaced k others; a `gap` message for events
it lost), so a client tells coalesced events from lost ones; the peers say neither, and
whatever has not arrived by the end is counted missing.

`read` is the load generator's hot path: one JSON parse and a few lookups per frame.
"""

from __future__ import annotations

import socket
from typing import Any

import orjson

from benchmarks import rawws
from benchmarks.rawws import RawWS

PAD = "x" * 60  # with the job id, n, state and timestamp, a payload of about 100 bytes

#: A frame read: (publish time, n, final, coalesced, lost). An event has lost = 0; a
#: jobwire `gap` message has no time and says how many events were lost.
Reading = tuple[float | None, int, bool, int, int]


def state(n: int, phase: int) -> str:
    """The state of a job's `n`th event: a new one every `phase` events."""
    return f"PHASE-{n // phase}"


def is_transition(n: int, final: bool, phase: int) -> bool:
    return final or n % phase == 0


def transitions(events: int, phase: int) -> int:
    """Transitions among a job's `events` events: every phase's first, and the final."""
    return len(range(0, events - 1, phase)) + 1 if events else 0


def payload(job: str, n: int, phase: int, final: bool, ts: float) -> bytes:
    """The peers' event (they forward bytes; jobwire records its own, see `servers`)."""
    return orjson.dumps({"job": job, "n": n, "state": state(n, phase), "ts": ts, "final": final, "pad": PAD})


class Speaker:
    """One peer's client protocol."""

    async def connect(self, port: int, job: str, *, sock: socket.socket | None = None) -> RawWS:
        raise NotImplementedError

    def read(self, ws: RawWS, frame: bytes) -> Reading | None:
        raise NotImplementedError


class JobwireSpeaker(Speaker):
    def __init__(self, token: str | None = None) -> None:
        self.query = f"?token={token}" if token else ""

    async def connect(self, port: int, job: str, *, sock: socket.socket | None = None) -> RawWS:
        ws = await rawws.connect(port, "/ws" + self.query, sock=sock)
        ws.send_text(orjson.dumps({"op": "subscribe", "job_ids": [job]}).decode())
        while b'"subscribed"' not in await ws.recv():
            pass
        return ws

    def read(self, ws: RawWS, frame: bytes) -> Reading | None:
        msg = orjson.loads(frame)
        kind = msg.get("type")
        if kind == "event":
            body = msg.get("progress") or msg.get("result") or {}
            return msg["ts"], body.get("n", -1), msg["final"], msg.get("coalesced", 0), 0
        if kind == "gap":
            return None, 0, False, 0, msg["to"] - msg["from"] + 1
        return None


class RelaySpeaker(Speaker):
    async def connect(self, port: int, job: str, *, sock: socket.socket | None = None) -> RawWS:
        ws = await rawws.connect(port, f"/ws/{job}", sock=sock)
        await ws.recv()  # {"type":"subscribed"}
        return ws

    def read(self, ws: RawWS, frame: bytes) -> Reading | None:
        msg = orjson.loads(frame)
        return msg["ts"], msg["n"], msg["final"], 0, 0


class SocketIOSpeaker(Speaker):
    async def connect(self, port: int, job: str, *, sock: socket.socket | None = None) -> RawWS:
        ws = await rawws.connect(port, f"/socket.io/?EIO=4&transport=websocket&job={job}", sock=sock)
        await ws.recv()  # 0{"sid":…}: the Engine.IO handshake
        ws.send_text("40")  # join the default namespace
        while not (await ws.recv()).startswith(b"40"):
            pass
        return ws

    def read(self, ws: RawWS, frame: bytes) -> Reading | None:
        if frame == b"2":  # Engine.IO ping
            ws.send_text("3")
            return None
        if frame.startswith(b"42"):
            msg = orjson.loads(orjson.loads(frame[2:])[1])
            return msg["ts"], msg["n"], msg["final"], 0, 0
        return None


def speaker(peer: str, **options: Any) -> Speaker:
    """The client protocol of the peer named `peer` (see `servers.PEERS`)."""
    if peer == "jobwire":
        return JobwireSpeaker(**options)
    if peer == "broadcaster":
        return RelaySpeaker()
    if peer == "python-socketio":
        return SocketIOSpeaker()
    raise ValueError(f"no client for peer {peer!r}")
