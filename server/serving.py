"""Serving the app with uvicorn, and leaving it gracefully.

uvicorn's shutdown closes every websocket with 1012 at once. jobwire first tells its own
clients it is going away: websockets close with 1001 and SSE streams end, so every client
reconnects at once (perhaps to another process) and resumes from its seqs, before
uvicorn's grace period starts.
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's server, with jobwire's goodbye before uvicorn's shutdown."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app: Any = self.config.loaded_app
        while app is not None and not hasattr(app, "state"):  # unwrap uvicorn's middleware
            app = getattr(app, "app", None)
        services = getattr(getattr(app, "state", None), "jobwire", None)
        if services is not None:
            await services.going_away()
        await super().shutdown(sockets)
