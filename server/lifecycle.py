"""When jobwire's services run: from its own lifespan, from a host's, or from first use.

`jobwire serve` runs the app's lifespan, and the services (the Redis client, the hub, the
bridge) start before the first request and stop after the last. Mounted inside another app,
that lifespan never runs: Starlette's `Mount`, FastAPI's `app.mount` and Django's ASGI
handler do not pass the lifespan on to a sub-app, and the first request used to fail with
`'State' object has no attribute 'jobwire'`. So the services are started by whichever comes
first: the app's own lifespan, a host's lifespan that `jobwire.mount()` joined, or the first
request or websocket that reaches the app (`StartOnFirstUse`). They stop with the lifespan
that started them; started at first use, they last as long as the process.

`jobwire serve`'s graceful goodbye (1001 to every websocket, before uvicorn's shutdown)
finds every jobwire app in the app it serves (`lifecycles_in`), mounted ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from jobwire.protocol import Disconnects
from jobwire.server.errors import error_response
from jobwire.server.services import Services
from jobwire.settings import Settings

log = logging.getLogger(__name__)

#: Builds the services and tears them down: the context manager `create_app` writes.
Run = Callable[[], AbstractAsyncContextManager[Services]]


class Lifecycle:
    """One app's services: started once, by the first of its starters, stopped once."""

    def __init__(self, run: Run, settings: Settings) -> None:
        self._run = run
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self.settings = settings  # what the app was built with (`jobwire serve --app` reads it)
        self.services: Services | None = None
        self.stopped = False  # by a lifespan: a late request must not start them again

    @property
    def running(self) -> bool:
        return self.services is not None

    async def start(self) -> Services:
        """Start the services unless they run; concurrent first requests start them once."""
        if self.services is not None:
            return self.services
        async with self._lock:
            if self.services is None:
                stack = contextlib.AsyncExitStack()
                self.services = await stack.enter_async_context(self._run())
                self._stack = stack
                self.stopped = False
        return self.services

    async def stop(self) -> None:
        async with self._lock:
            stack, self._stack, self.services = self._stack, None, None
            self.stopped = True
            if stack is not None:
                await stack.aclose()

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """The services for the length of a lifespan (the app's own, or a host's)."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()


def lifecycles_in(app: Any) -> list[Lifecycle]:
    """The jobwire apps inside `app`: itself, or mounted in it (at any depth, through
    uvicorn's and Starlette's wrappers, Starlette/FastAPI mounts and `jobwire.mount()`)."""
    found: list[Lifecycle] = []
    seen: set[int] = set()
    todo = [app]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or len(seen) > 10_000:
            continue
        seen.add(id(node))
        lifecycle = getattr(getattr(node, "state", None), "lifecycle", None)
        if isinstance(lifecycle, Lifecycle):
            found.append(lifecycle)
        todo.append(getattr(node, "app", None))  # middleware, Mount, jobwire.mount()'s dispatch
        todo.append(getattr(node, "host", None))
        todo.extend(getattr(route, "app", None) for route in getattr(node, "routes", None) or ())
    return found


async def going_away(app: Any) -> None:
    """Tell the clients of every running jobwire app in `app` that the server goes away
    (see `Services.going_away`)."""
    await asyncio.gather(
        *(lc.services.going_away() for lc in lifecycles_in(app) if lc.services is not None),
        return_exceptions=True,
    )


class StartOnFirstUse:
    """ASGI middleware: starts the services at the first request or websocket when no
    lifespan did (mounted where no lifespan reaches the app). One attribute read per
    request once they run."""

    def __init__(self, app: Any, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.lifecycle.services is None and scope["type"] in ("http", "websocket"):
            if self.lifecycle.stopped:  # the app's lifespan ended: shutting down, not starting
                await _shutting_down(scope, send)
                return
            log.info("jobwire: no lifespan started the services (mounted?): starting them at first use")
            await self.lifecycle.start()
        await self.app(scope, receive, send)


async def _shutting_down(scope: dict[str, Any], send: Any) -> None:
    """A request after the services stopped: "try later" (elsewhere), on either transport."""
    if scope["type"] == "websocket":
        disconnect = Disconnects.GOING_AWAY
        await send({"type": "websocket.close", "code": disconnect.code, "reason": disconnect.reason})
        return
    response = error_response(503, "unavailable", "the server is shutting down; try again")
    response.headers["Retry-After"] = "2"
    await response(scope, _nothing, send)


async def _nothing() -> dict[str, Any]:
    return {"type": "http.disconnect"}
