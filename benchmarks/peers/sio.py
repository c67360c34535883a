"""python-socketio with AsyncRedisManager: each client joins its job's room; events are
emitted from another process through a write-only manager.

    uvicorn benchmarks.peers.sio:app   (REDIS_URL in the environment)
"""

import os
from urllib.parse import parse_qs

import socketio

manager = socketio.AsyncRedisManager(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins="*")


@sio.event
async def connect(sid, environ, auth=None):
    job = parse_qs(environ.get("QUERY_STRING", "")).get("job", [""])[0]
    await sio.enter_room(sid, job)


app = socketio.ASGIApp(sio)
