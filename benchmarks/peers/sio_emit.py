"""Emits events for the python-socketio peer, as its users do from a worker: a write-only
AsyncRedisManager. Reads `<room> <payload>` lines on stdin."""

import asyncio
import os
import sys

import socketio


async def main() -> None:
    manager = socketio.AsyncRedisManager(os.environ["REDIS_URL"], write_only=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        room, payload = line.decode().rstrip("\n").split(" ", 1)
        await manager.emit("ev", payload, room=room)


asyncio.run(main())
