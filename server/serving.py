"""Serving the app with uvicorn, and leaving it gracefully.

uvicorn's shutdown closes every websocket with 1012 at once. jobwire first tells its own
clients it is going away: websockets close with 1001 and SSE streams end, so every client
reconnects at once (perhaps to another process) and resumes from its seqs, before
uvicorn's grace period starts.

`uvicorn_config` is the one place uvicorn's settings are chosen, for `jobwire serve` and
for the tests' servers alike:

- Keepalive pings every `PING_INTERVAL` seconds, and uvicorn's ping timeout set past
  jobwire's stall timeout (`PING_TIMEOUT_MARGIN` later). jobwire's `StallWatch` counts an
  unanswered ping as accepting nothing, so a stalled client is closed by jobwire's policy
  (1013, "resume by seq"), and uvicorn's 1011 "keepalive ping timeout" is only a backstop.
- Proxy headers only from `forwarded_allow_ips`. uvicorn, left alone, believes
  X-Forwarded-For from 127.0.0.1, so any process on the host could claim any address and
  step past the per-address limits; jobwire believes no one unless told.
- Request heads bounded with JSON answers (`server.heads.HttpProtocol`).

`run` serves one process to its end: `jobwire serve` with one worker, and each worker of
`jobwire serve --workers N` (see `server.workers`).
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from jobwire.server import lifecycle
from jobwire.server.heads import HttpProtocol
from jobwire.server.lean_ws import LeanWebSocket
from jobwire.settings import Settings

# Timeouts
PING_INTERVAL = 20.0  # seconds between keepalive pings (well inside proxies' 60 s idle timeouts)
PING_TIMEOUT_MARGIN = 5.0  # uvicorn gives up on a pong this long after jobwire's stall timeout


def uvicorn_config(
    app: Any,
    settings: Settings,
    *,
    host: str,
    port: int,
    ping_interval: float = PING_INTERVAL,
    **overrides: Any,
) -> uvicorn.Config:
    """uvicorn's configuration for serving `app` (see the module docstring)."""
    trusted = settings.forwarded_allow_ips
    options: dict[str, Any] = dict(
        host=host,
        port=port,
        # SSE streams never end by themselves; do not let them hold a shutdown forever.
        timeout_graceful_shutdown=5,
        # Events are small JSON frames: compressing each one per socket costs more CPU
        # than it saves bandwidth (Centrifugo makes the same choice by default).
        ws_per_message_deflate=False,
        # jobwire's lean protocol unless told otherwise (see server.lean_ws)
        ws=LeanWebSocket if settings.ws_protocol == "lean" else "auto",
        # A bigger websocket frame is closed with 1009 (request heads: see server.heads).
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=ping_interval,
        ws_ping_timeout=settings.stall_timeout + PING_TIMEOUT_MARGIN,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=list(trusted) or None,
    )
    if HttpProtocol is not None:
        options["http"] = HttpProtocol.limited(settings.max_url_bytes, settings.max_header_bytes)
    return uvicorn.Config(app, **{**options, **overrides})


class Server(uvicorn.Server):
    """uvicorn's server, with jobwire's goodbye before uvicorn's shutdown. `on_started` is
    called once it serves (a worker tells its supervisor so)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await lifecycle.going_away(self.config.loaded_app)  # mounted jobwire apps too
        await super().shutdown(sockets)


def run(server: Server, sockets: list[socket.socket] | None = None) -> None:
    """Serve until told to stop (on `sockets`, a worker's share of the port, if given)."""
    # The cyclic GC walks every tracked object in its older generations, and a server with
    # thousands of sockets has hundreds of thousands of them, long-lived: a collection per
    # 700 new containers cost ~9% of the CPU at 50,000 deliveries/s. Freeze what startup
    # built and collect the young generation less often (a server, not a library, decides).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    server.run(sockets)
