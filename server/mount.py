"""jobwire inside another app, under a prefix, in one call: `jobwire.mount(app, "/progress")`.

What mounting by hand loses, and what this keeps:

- **The services.** A mounted app's lifespan does not run. jobwire's start at first use
  anyway (`server.lifecycle`); given a Starlette or FastAPI host, they also start with the
  host's lifespan and stop with it, after the host's own start-up and before its shutdown.
- **The direct writes.** A host's middleware wraps the ASGI `send`, and the frames then take
  the slow path (`server.direct`). `RawSend` is added to the host, outside its middleware.
- **The prefix.** Starlette's `Mount` (and the dispatcher below, for other hosts) sets the
  scope's `root_path`; jobwire builds every URL it hands out from it (links, `openapi.json`
  `servers`), and the dashboard finds the API beside itself.

A Starlette or FastAPI host gets jobwire mounted in place and is returned. Any other ASGI
app (Django's `get_asgi_application()`) is wrapped: the returned app sends the prefix to
jobwire, the rest to the host, and runs jobwire's start and stop inside the host's lifespan
(or alone, for a host like Django that does not speak it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette

from jobwire.server.direct import RawSend
from jobwire.server.lifecycle import Lifecycle
from jobwire.settings import Settings

log = logging.getLogger(__name__)
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$")


def mount(host: Any, prefix: str = "/jobwire", *, settings: Settings | None = None) -> Any:
    """Serve jobwire under `prefix` of `host` (see the module docstring); returns the app to
    serve: `host` itself when it is a Starlette or FastAPI app, else a wrapper of it."""
    from jobwire.server.app import create_app  # the server's imports only when mounting

    prefix = _checked(prefix)
    app = create_app(settings)
    lifecycle: Lifecycle = app.state.lifecycle
    if isinstance(host, Starlette):  # FastAPI's app is one
        try:
            host.add_middleware(RawSend)
        except RuntimeError:
            raise RuntimeError(
                "jobwire.mount(): the host app has already started; mount jobwire where the app is built"
            ) from None
        host.mount(prefix, app, name="jobwire")
        _join_lifespan(host, lifecycle)
        return host
    if not callable(host):
        raise TypeError(f"jobwire.mount(): the host must be an ASGI app, not {type(host).__name__}")
    return PrefixDispatch(host, prefix, app)


def _checked(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX.match(prefix.rstrip("/") or "/"):
        raise ValueError(
            f"jobwire.mount(): prefix must be a path like '/progress' (one or more segments, "
            f"no query), got {prefix!r}"
        )
    return prefix.rstrip("/")


def _join_lifespan(host: Starlette, lifecycle: Lifecycle) -> None:
    """Run jobwire's services inside the host's lifespan: after its start-up, before its
    shutdown (so the host's own start-up may submit jobs, and its shutdown still can)."""
    inner = host.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            async with lifecycle.lifespan():
                yield state

    host.router.lifespan_context = lifespan


class PrefixDispatch:
    """An ASGI app: `prefix` and below to jobwire (its `root_path` extended, as Starlette's
    `Mount` does), the bare prefix redirected to `prefix/`, everything else to `host`. The
    lifespan goes to both (see `_lifespan`)."""

    def __init__(self, host: Any, prefix: str, app: Starlette) -> None:
        self.host = host
        self.prefix = prefix
        self.app = RawSend(app)  # outermost: the server's own send, before anyone wraps it
        self.lifecycle: Lifecycle = app.state.lifecycle

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope["path"]
        route = path[len(root) :] if root and path.startswith(root) else path
        if route.startswith(self.prefix + "/"):
            await self.app({**scope, "root_path": root + self.prefix}, receive, send)
        elif route == self.prefix and kind == "http":
            query = scope.get("query_string", b"")
            location = (root + self.prefix + "/").encode() + (b"?" + query if query else b"")
            await send({"type": "http.response.start", "status": 307, "headers": [(b"location", location)]})
            await send({"type": "http.response.body", "body": b""})
        else:
            await self.host(scope, receive, send)

    async def _lifespan(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """jobwire's start inside the host's lifespan, as `_join_lifespan` does for a
        Starlette host: the host starts first and stops last. A host that does not speak
        the lifespan (Django raises on it, as ASGI allows) is left out of it."""
        host = _HostLifespan(self.host, scope)
        message = await receive()  # lifespan.startup
        failed = await host.step(message)
        if failed is None:
            try:
                await self.lifecycle.start()
            except Exception as exc:
                failed = f"jobwire did not start: {exc!r}"
        if failed is not None:
            await send({"type": "lifespan.startup.failed", "message": failed})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()  # lifespan.shutdown
        try:
            await self.lifecycle.stop()
        finally:
            failed = await host.step(message)
        if failed is None:
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await send({"type": "lifespan.shutdown.failed", "message": failed})


class _HostLifespan:
    """The host's side of the lifespan, run in a task of its own and fed one message at a
    time: `step` passes a message on and waits for the host's answer."""

    def __init__(self, host: Any, scope: dict[str, Any]) -> None:
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task = asyncio.create_task(host(dict(scope), self._inbox.get, self._answers.put))
        self.speaks = True

    async def step(self, message: dict[str, Any]) -> str | None:
        """None when the host is done with `message` (or does not speak the lifespan); the
        host's failure message otherwise."""
        if not self.speaks:
            return None
        await self._inbox.put(message)
        answer = asyncio.ensure_future(self._answers.get())
        await asyncio.wait({answer, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            reply = answer.result()
            return reply.get("message", "failed") if reply["type"].endswith(".failed") else None
        answer.cancel()
        self.speaks = False  # it returned or raised without answering: no lifespan there
        if not self._task.cancelled() and self._task.exception() is not None:
            log.debug("the host app does not speak the lifespan: %r", self._task.exception())
        return None
