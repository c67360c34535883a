"""A Starlette + broadcaster relay: one subscription per socket, each message forwarded.

    uvicorn benchmarks.peers.relay:app   (REDIS_URL in the environment)

Runs with broadcaster 0.3.1 and redis-py 5.2.1 (`.venv-peers`): with redis-py 8, whose
asyncio `PubSub.subscribe()` yields before recording the channel, broadcaster 0.3.1's
reader sees no subscription and delivers nothing to a lone first subscriber.
"""

import asyncio
import os
from contextlib import asynccontextmanager

from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

broadcast = Broadcast(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


async def relay(ws: WebSocket) -> None:
    """As broadcaster's README does: a sender and a receiver, until either ends (the
    receiver notices the client leaving)."""
    await ws.accept()

    async def receiver() -> None:
        async for _ in ws.iter_text():
            pass

    async def sender() -> None:
        async with broadcast.subscribe(ws.path_params["channel"]) as subscriber:
            await ws.send_text('{"type":"subscribed"}')
            async for event in subscriber:
                await ws.send_text(event.message)

    tasks = [asyncio.create_task(receiver()), asyncio.create_task(sender())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


@asynccontextmanager
async def lifespan(app):
    await broadcast.connect()
    yield
    await broadcast.disconnect()


app = Starlette(routes=[WebSocketRoute("/ws/{channel}", relay)], lifespan=lifespan)
