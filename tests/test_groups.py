"""Groups and chords as one job: the aggregate of its children, streamed like any job."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import redis
import websockets

from jobwire.tasks.recorder import Parent, Recorder
from tests.clients import assert_gap_free, events_until_final, until_subscribed
from tests.support import RedisServer, RunningServer, settings_for


async def _submit(base_url: str, body: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        resp = await http.post("/api/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["job_id"])


async def _watch(ws_url: str, job_id: str) -> list[dict[str, Any]]:
    async with websockets.connect(f"{ws_url}/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
        events = await until_subscribed(ws, job_id)
        return await events_until_final(ws, job_id, timeout=60, events=events)


async def test_group_of_200_streams_rising_done_counts_then_success(server: RunningServer) -> None:
    body = {"group": [{"task": "plain_sum", "args": [[i, 1]]} for i in range(200)]}
    group_id = await _submit(server.url, body)
    events = await asyncio.wait_for(_watch(server.ws_url, group_id), 120)
    assert_gap_free(events)
    assert events[0]["state"] == "PENDING" and events[0]["task"] == "group"
    running = [e["progress"] for e in events if e["state"] == "RUNNING"]
    done = [p["done"] for p in running]
    assert done == sorted(done) and len(set(done)) == len(done), "done counts only rise"
    final = events[-1]
    assert final["state"] == "SUCCESS" and final["progress"] == {
        "done": 200,
        "failed": 0,
        "total": 200,
        "percent": 100,
    }
    async with httpx.AsyncClient(base_url=server.url) as http:
        page = (await http.get(f"/api/v1/jobs/{group_id}/children", params={"offset": 150})).json()
    assert page["total"] == 200 and len(page["children"]) == 50
    assert {c["status"] for c in page["children"]} == {"SUCCESS"}


async def test_chord_callback_is_the_final_phase_and_a_failed_child_fails_it(server: RunningServer) -> None:
    """Celery's chord semantics: the callback gets the children's results; if a child
    fails, the callback never runs and fails with ChordError, and so does the chord."""
    ok = await _submit(
        server.url,
        {
            "group": [{"task": "plain_sum", "args": [[i]]} for i in range(1, 5)],
            "callback": {"task": "plain_sum"},
        },
    )
    failed = await _submit(
        server.url,
        {
            "group": [
                {"task": "plain_sum", "args": [[1]]},
                {"task": "failing_task", "kwargs": {"delay": 0}},
                {"task": "plain_sum", "args": [[2]]},
            ],
            "callback": {"task": "plain_sum"},
        },
    )
    good, bad = await asyncio.wait_for(
        asyncio.gather(_watch(server.ws_url, ok), _watch(server.ws_url, failed)), 60
    )
    assert good[-1]["state"] == "SUCCESS" and good[-1]["result"] == 10.0  # the callback's result
    assert "CALLBACK" in [e["state"] for e in good]
    assert good[-2]["progress"]["done"] == 4

    assert bad[-1]["state"] == "FAILURE" and bad[-1]["error"]["type"] == "ChordError"
    assert max(e["progress"]["failed"] for e in bad if e["state"] in ("RUNNING", "CALLBACK")) == 1
    async with httpx.AsyncClient(base_url=server.url) as http:
        children = (await http.get(f"/api/v1/jobs/{failed}/children")).json()["children"]
        assert sorted(c["status"] for c in children) == ["FAILURE", "SUCCESS", "SUCCESS"]
        snapshot = (await http.get(f"/api/v1/jobs/{failed}")).json()
    assert snapshot["status"] == "FAILURE"


def test_aggregate_costs_the_same_per_child_at_any_size(own_redis: RedisServer) -> None:
    """Each child's end costs one script call on the group, at 100 or 10,000 children:
    a counter, not a scan."""
    settings = settings_for(own_redis.url)
    recorder = Recorder(redis.Redis.from_url(own_redis.url), settings)
    per_child, commands_per_child = {}, {}
    for size in (100, 10_000):
        group_id = f"g{size}"
        children = [f"{group_id}-{i}" for i in range(size)]
        recorder.create_group(group_id, "group", children)
        for child in children:
            recorder.record(child, "PENDING", parent=Parent(group_id))
        before, commands = _calls(own_redis), _commands(own_redis)
        for child in children:
            recorder.record(child, "SUCCESS", result=1)
        per_child[size] = (_calls(own_redis) - before) / size
        commands_per_child[size] = (_commands(own_redis) - commands) / size
        snapshot = recorder.client.hgetall(settings.keys.job(group_id))
        assert snapshot[b"state"] == b"SUCCESS" and snapshot[b"done"] == str(size).encode()
    # The child's own event and the group's: two script calls, whatever the size. Inside
    # them, the same commands (33 at 100), plus the group's history trimming that starts
    # past 1,000 events (four per event): a constant, not a scan of 10,000 children.
    assert per_child == {100: 2.0, 10_000: 2.0}
    assert commands_per_child[10_000] <= commands_per_child[100] + 4, commands_per_child


def _stats(server: RedisServer) -> dict[str, Any]:
    return server.client().info("commandstats")  # type: ignore[no-any-return]


def _calls(server: RedisServer) -> int:
    """Script calls Redis has run (EVALSHA, EVAL)."""
    return sum(int(v["calls"]) for k, v in _stats(server).items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def _commands(server: RedisServer) -> int:
    """Every command Redis has run, those inside scripts included."""
    return sum(int(v["calls"]) for v in _stats(server).values())
