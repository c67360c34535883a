"""A flooder costs its neighbours little: subscribes naming many ids are answered with one
Redis command, and taken one at a time per process, while small messages never wait.
(What a flood costs in latency is a benchmark figure: `python -m benchmarks.abuse`.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

from tests.clients import next_of
from tests.support import RedisServer, run_server, settings_for, wait_until
from tests.test_recorder import Monitor


def _subscribe(ids: list[str]) -> str:
    return json.dumps({"op": "subscribe", "job_ids": ids})


async def test_a_subscribe_of_1000_unknown_ids_is_one_redis_command(own_redis: RedisServer) -> None:
    unknown = [f"never-{i}" for i in range(1000)]
    async with run_server(settings_for(own_redis.url)) as srv:
        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
            await ws.send(_subscribe(["warm-up-1", "warm-up-2"]))  # loads the script first
            await next_of(ws, "error")
            monitor = Monitor(own_redis)
            await ws.send(_subscribe(unknown))
            answer = await next_of(ws, "error", "event")
            commands = [c for c in monitor.stop() if c != "PING"]  # the hub's keepalive may fall here
    assert answer["code"] == "job_not_found" and answer["job_ids"] == unknown
    assert commands == ["EVALSHA"]


class _Counted(asyncio.Lock):
    """The process's lock for big messages, saying how many wait for it."""

    waiting = 0

    async def acquire(self) -> bool:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1


async def test_big_subscribes_run_one_at_a_time_and_small_messages_never_wait(
    own_redis: RedisServer,
) -> None:
    """Three sockets subscribe to 200 unknown ids each at once: while the first one's read
    is held, the other two wait for the lock (not in the loop), and a fourth socket's
    ping and one-id subscribe are answered meanwhile. Released, all three are answered;
    never were two big reads under way together."""
    async with run_server(settings_for(own_redis.url)) as srv:
        svc = srv.services
        svc.big_messages = lock = _Counted()
        read, gate = svc.store.visible, asyncio.Event()
        in_flight, most = 0, 0

        async def held_visible(job_ids: list[str], principal: Any) -> set[str]:
            nonlocal in_flight, most
            if len(job_ids) <= 100:
                return await read(job_ids, principal)
            in_flight += 1
            most = max(most, in_flight)
            try:
                await gate.wait()
                return await read(job_ids, principal)
            finally:
                in_flight -= 1

        svc.store.visible = held_visible
        floods = [await websockets.connect(f"{srv.ws_url}/ws") for _ in range(3)]
        async with websockets.connect(f"{srv.ws_url}/ws") as neighbour:
            for n, ws in enumerate(floods):
                await ws.send(_subscribe([f"flood-{n}-{i}" for i in range(200)]))
            await wait_until(
                lambda: in_flight == 1 and lock.waiting == 2, what="one big read held, two waiting"
            )
            await neighbour.send(json.dumps({"op": "ping"}))
            assert (await next_of(neighbour, "pong"))["type"] == "pong"
            await neighbour.send(_subscribe(["small-one"]))
            assert (await next_of(neighbour, "error"))["job_id"] == "small-one"
            assert lock.waiting == 2 and in_flight == 1
            gate.set()
            for n, ws in enumerate(floods):
                answer = await next_of(ws, "error")
                assert answer["code"] == "job_not_found" and len(answer["job_ids"]) == 200, n
                await ws.close()
    assert most == 1
