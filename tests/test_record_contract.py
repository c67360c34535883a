"""The record contract (`jobwire.record`) against the script it calls (`scripts/record.lua`).

The script reads its arguments by position, so a value put in the wrong place records a
wrong event without an error. `jobwire.record.ARGV` writes the order once; these tests
read the script's own text and hold it to that order, check what the builder renders for
representative calls (expected lists written out by hand from the script's meaning), and
read replies. The last test runs both writers' shared step for real: the bridge counts a
group's child it hears end.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from jobwire import record
from jobwire.protocol import (
    CALLBACK_ROLE,
    CHILD_ROLE,
    PARENT_HEADER,
    ROLE_HEADER,
    RUNNING,
    SUBJECT_HEADER,
    TENANT_HEADER,
)
from jobwire.record import (
    ARGV,
    KEYS,
    CeleryMeta,
    Owner,
    Parent,
    RecordCall,
    RecordReply,
    index_commands,
    parent_call,
    parse_reply,
    record_call,
)
from jobwire.server.bridge import Bridge
from jobwire.settings import Settings
from jobwire.tasks.recorder import Recorder
from tests.support import RedisServer, settings_for

LUA = (files("jobwire.scripts") / "record.lua").read_text()

# -- The order: Python's ARGV tuple against record.lua ------------------------------------


def _code(lua: str) -> list[str]:
    """The script's lines, comments left out."""
    return [line.split("--", 1)[0] for line in lua.splitlines() if line.split("--", 1)[0].strip()]


def lua_argv_locals(lua: str) -> dict[int, str]:
    """ARGV position -> the local the script reads it into, from its `local a, b = ARGV[1],
    tonumber(ARGV[2])` lines; an ARGV read anywhere else is an error (the names would
    then say nothing about the positions)."""
    found: dict[int, str] = {}
    for line in _code(lua):
        if "ARGV[" not in line:
            continue
        match = re.fullmatch(r"\s*local\s+([\w\s,]+?)\s*=\s*(.+?)\s*", line)
        assert match, f"record.lua reads ARGV outside a `local ... = ARGV[n]` line: {line.strip()!r}"
        names = [n.strip() for n in match[1].split(",")]
        exprs = [e.strip() for e in match[2].split(",")]
        assert len(names) == len(exprs), line
        for name, expr in zip(names, exprs, strict=True):
            index = re.fullmatch(r"(?:tonumber\()?ARGV\[(\d+)\]\)?", expr)
            assert index, f"{name} is not read straight from ARGV: {expr!r}"
            assert int(index[1]) not in found, f"ARGV[{index[1]}] read twice"
            found[int(index[1])] = name
    return found


def lua_argv_comment(lua: str) -> dict[int, str]:
    """ARGV position -> name, from the list in the script's header comment."""
    return {int(n): name for n, name in re.findall(r"^--\s+ARGV\[(\d+)\]\s+(\w+)", lua, re.M)}


def check_order(order: tuple[str, ...], lua: str) -> None:
    """`order` is the script's ARGV, position by position, in its code and its comment."""
    python = dict(enumerate(order, start=1))
    assert lua_argv_locals(lua) == python, "record.lua's ARGV locals and jobwire.record.ARGV differ"
    assert lua_argv_comment(lua) == python, "record.lua's ARGV comment and jobwire.record.ARGV differ"


def test_python_argv_order_is_the_scripts() -> None:
    check_order(ARGV, LUA)


def test_the_check_catches_a_swap_either_side() -> None:
    swapped = list(ARGV)
    swapped[10], swapped[11] = swapped[11], swapped[10]  # limit and ttl: both numbers
    with pytest.raises(AssertionError):
        check_order(tuple(swapped), LUA)
    lua = LUA.replace("ARGV[24], ARGV[25]", "ARGV[25], ARGV[24]")  # parent and role
    assert lua != LUA
    with pytest.raises(AssertionError):
        check_order(ARGV, lua)


def test_keys_are_the_scripts() -> None:
    used = {int(n) for line in _code(LUA) for n in re.findall(r"KEYS\[(\d+)\]", line)}
    assert used == set(range(1, len(KEYS) + 1))
    assert "#KEYS >= 5" in LUA and KEYS[4] == "celery_key", "only Celery's key is optional"
    comments = " ".join(line.split("--", 1)[1] for line in LUA.splitlines() if "--" in line)
    documented = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", comments)}
    assert documented == used


def test_every_field_of_a_call_is_rendered_and_nothing_else() -> None:
    assert len(set(ARGV)) == len(ARGV) and len(set(KEYS)) == len(KEYS)
    assert {f.name for f in dataclasses.fields(RecordCall)} == set(ARGV) | set(KEYS)


# -- What the builder renders ---------------------------------------------------------------

TS = 1700000000.25
HEX = "00112233445566778899aabbccddeeff"


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The event's time and the random ids the builder draws, fixed."""
    monkeypatch.setattr(record.time, "time", lambda: TS)
    monkeypatch.setattr(record.uuid, "uuid4", lambda: uuid.UUID(HEX))


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": "redis://127.0.0.1:1/0",
        "key_prefix": "jw:",
        "result_expires": 3600,
        "history_limit": 50,
        "history_max": 20,  # under history_limit: the script gets history_limit
        "recent_limit": 7,
        "redis_cluster": False,
    }
    return Settings(**{**values, **overrides})


def _keys(job_id: str) -> list[Any]:
    return [f"jw:{{{job_id}}}:{name}" for name in ("job", "events", "progress", "eids")]


def test_a_progress_event(frozen: None) -> None:
    """What `Recorder.record_state` sends for a custom state, no owner, no Celery write."""
    call = record_call(
        _settings(), "j1", "PROGRESS", progress={"step": 1, "total": 4, "percent": 25.0}, task="crunch"
    )
    assert call.keys() == _keys("j1")
    assert (
        call.argv()
        == [
            "j1",  # job_id
            "PROGRESS",
            "0",  # not final
            b'{"job_id":"j1","seq":',
            b',"state":"PROGRESS","progress":{"step":1,"total":4,"percent":25.0},"ts":1700000000.25,'
            b'"final":false,"task":"crunch"}',
            b'{"step":1,"total":4,"percent":25.0}',  # progress
            "",  # result
            "",  # error
            "crunch",
            "1700000000.25",  # ts
            50,  # history limit
            3600,  # ttl
            "0",  # only_if_new
            "jw:{j1}:live",
            "jw:events",
            HEX,  # a fresh event id
            "",  # no owner
            "",
            "jw:tenant-events:",
            HEX[:12],  # the epoch, should this event create the record
            "0",  # not a cluster
            50,  # history_max, never under history_limit
            "0",  # no dedupe
            "",  # no parent
            "",
            "",  # no outcome
        ]
    )
    assert call.ts == TS


def test_a_final_event_with_celerys_write_owner_and_parent(frozen: None) -> None:
    """A group's child ends: Celery's result rides along, on a cluster."""
    call = record_call(
        _settings(redis_cluster=True, history_max=500),
        "j2",
        "SUCCESS",
        result={"rows": 3},
        task="crunch",
        celery_meta=CeleryMeta(b"jw:celery-task-meta-j2", b'{"status":"SUCCESS"}', None),
        event_id="e-1",
        owner=Owner("acme", "alice"),
        parent=Parent("g1"),
    )
    assert call.keys() == [*_keys("j2"), b"jw:celery-task-meta-j2"]
    assert (
        call.argv()
        == [
            "j2",
            "SUCCESS",
            "1",  # final
            b'{"job_id":"j2","seq":',
            b',"state":"SUCCESS","progress":null,"ts":1700000000.25,"final":true,"task":"crunch",'
            b'"result":{"rows":3}}',
            "",  # no progress
            b'{"rows":3}',
            "",
            "crunch",
            "1700000000.25",
            50,
            3600,
            "0",
            "jw:{j2}:live",
            "jw:events",
            "e-1",
            "acme",
            "alice",
            "jw:tenant-events:",
            HEX[:12],
            "1",  # sharded: a cluster
            500,
            "0",
            "g1",
            "child",
            "",
            b'{"status":"SUCCESS"}',  # Celery's value
            0,  # Celery's ttl: none
        ]
    )


def test_a_registration_at_publish_and_a_retry(frozen: None) -> None:
    settings = _settings()
    pending = record_call(
        settings, "cb", "PENDING", task="sum", only_if_new=True, parent=Parent("c1", CALLBACK_ROLE)
    )
    args = pending.argv()
    assert args[12] == "1" and args[23:26] == ["c1", "callback", ""]
    assert args[4] == b',"state":"PENDING","progress":null,"ts":1700000000.25,"final":false,"task":"sum"}'
    retry = record_call(
        settings,
        "j3",
        "RETRY",
        error={"type": "KeyError", "message": "x"},
        retry={"attempt": 1, "countdown": 2.0, "eta": None},
    )
    args = retry.argv()
    assert args[2] == "0" and args[6] == "" and args[7] == b'{"type":"KeyError","message":"x"}'
    assert args[4] == (
        b',"state":"RETRY","progress":null,"ts":1700000000.25,"final":false,'
        b'"error":{"type":"KeyError","message":"x"},"retry":{"attempt":1,"countdown":2.0,"eta":null}}'
    )


def test_what_the_bridge_sends(frozen: None) -> None:
    """A publish heard: deduplicated by its digest, owned by the backend's tenant."""
    call = record_call(
        _settings(),
        "f1",
        "STARTED",
        task="shop.crunch",
        event_id="d" * 40,
        owner=Owner("shop", ""),
        dedupe=True,
    )
    args = call.argv()
    assert len(args) == 26 and len(call.keys()) == 4
    assert args[15:18] == ["d" * 40, "shop", ""] and args[22] == "1"


def test_counting_a_child_in_its_group(frozen: None) -> None:
    settings = _settings()
    ended = RecordReply(seq=5, created=False, parent=Parent("g1", CHILD_ROLE))
    failed = parent_call(settings, ended, "FAILURE", error={"type": "E", "message": "m"})
    assert failed is not None and failed.keys() == _keys("g1")
    assert (
        failed.argv()
        == [
            "g1",
            RUNNING,  # the script writes the group's event from its counters
            "0",
            b'{"job_id":"g1","seq":',
            b',"state":"RUNNING","progress":null,"ts":1700000000.25,"final":false}',
            "",
            "",
            "",
            "",
            "1700000000.25",
            50,
            3600,
            "0",
            "jw:{g1}:live",
            "jw:events",
            HEX,
            "",
            "",
            "jw:tenant-events:",
            HEX[:12],
            "0",
            50,
            "0",
            "",
            "",
            "failed",
        ]
    )
    ok = parent_call(settings, ended, "SUCCESS", result=3, owner=Owner("acme", "al"))
    assert ok is not None and ok.argv()[25] == "ok" and ok.argv()[16:18] == ["acme", "al"]
    assert ok.argv()[6] == "", "a child's result is not its group's"


def test_a_chords_callback_ends_the_chord_with_its_outcome(frozen: None) -> None:
    ended = RecordReply(seq=3, created=False, parent=Parent("c1", CALLBACK_ROLE))
    call = parent_call(_settings(), ended, "SUCCESS", result=[1, 2])
    assert call is not None
    args = call.argv()
    assert args[:3] == ["c1", "SUCCESS", "1"] and args[6] == b"[1,2]" and args[25] == ""


def test_no_parent_no_count() -> None:
    assert parent_call(_settings(), RecordReply(1, True, None), "SUCCESS") is None


# -- The reply ------------------------------------------------------------------------------


def test_replies() -> None:
    assert parse_reply(None) is None  # the script's `false`: refused
    assert parse_reply([7, 1, b"", b""]) == RecordReply(7, True, None)
    assert parse_reply([9, 0, b"g1", b"callback"]) == RecordReply(9, False, Parent("g1", "callback"))
    assert parse_reply([2, 0, "g\u00e9", "child"]) == RecordReply(2, False, Parent("g\u00e9", "child"))


def test_index_commands_and_owner_headers() -> None:
    class Pipe:
        def __init__(self) -> None:
            self.commands: list[tuple[Any, ...]] = []

        def zadd(self, *args: Any) -> None:
            self.commands.append(("zadd", *args))

        def zremrangebyrank(self, *args: Any) -> None:
            self.commands.append(("zremrangebyrank", *args))

    pipe = Pipe()
    index_commands(pipe, _settings(), "j1", TS, Owner("acme", "al"))
    assert pipe.commands == [
        ("zadd", "jw:jobs:recent", {"j1": TS}),
        ("zremrangebyrank", "jw:jobs:recent", 0, -8),
        ("zadd", "jw:tenant:acme:recent", {"j1": TS}),
        ("zremrangebyrank", "jw:tenant:acme:recent", 0, -8),
    ]
    assert Owner("acme", "al").headers() == {TENANT_HEADER: "acme", SUBJECT_HEADER: "al"}
    assert (TENANT_HEADER, SUBJECT_HEADER, PARENT_HEADER, ROLE_HEADER) == (
        "jobwire_tenant",
        "jobwire_sub",
        "jobwire_parent",
        "jobwire_role",
    )


# -- Both writers take the steps: the bridge counts a child too (against a real Redis) -----


@pytest.fixture
def sync_redis(session_redis: RedisServer) -> Iterator[redis.Redis]:
    client = session_redis.client()
    yield client
    client.close()


async def test_the_bridge_counts_a_groups_child_it_hears_end(
    session_redis: RedisServer, sync_redis: redis.Redis
) -> None:
    """The server's group submit records each child with its group; when the app's workers
    never attached jobwire, the bridge alone hears them end. It used to skip the count,
    and the group stayed PENDING for ever."""
    settings = settings_for(session_redis.url, celery_backends=(f"{session_redis.url}#prefix=contract:",))
    group_id, children = f"g-{uuid.uuid4()}", [f"c-{uuid.uuid4()}" for _ in range(2)]
    recorder = Recorder(sync_redis, settings)
    recorder.create_group(group_id, "group", children)
    for child in children:
        recorder.record(child, "PENDING", task="t", only_if_new=True, parent=Parent(group_id))
    client = Redis.from_url(session_redis.url)
    bridge = Bridge(client, settings)
    backend = bridge.backends[0]
    try:
        for child, status, result in ((children[0], "SUCCESS", 1), (children[1], "FAILURE", None)):
            meta = {"status": status, "result": result, "task_id": child, "name": "t"}
            if status == "FAILURE":
                meta["result"] = {"exc_type": "ValueError", "exc_message": ["no"]}
            await bridge._heard(backend, backend.key(child).encode(), json.dumps(meta).encode())
    finally:
        await bridge.stop()
        await client.aclose()
    group = sync_redis.hgetall(settings.keys.job(group_id))
    assert (group[b"done"], group[b"failed"], group[b"state"]) == (b"1", b"1", b"FAILURE")
    events = [json.loads(e) for e in sync_redis.zrange(settings.keys.history(group_id), 0, -1)]
    assert [e["state"] for e in events] == ["PENDING", "RUNNING", "FAILURE"]
    assert events[-1]["progress"] == {"done": 1, "failed": 1, "total": 2, "percent": 100}
