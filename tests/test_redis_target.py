"""Pure rules of high availability: what JOBWIRE_REDIS_URL may say (one Redis, cluster seeds,
sentinels), and which shard channels move when a cluster's slot map changes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from jobwire.redis_target import parse_target
from jobwire.server.slot_map import SlotMap, moves
from jobwire.settings import Settings, SettingsError


def test_one_redis() -> None:
    target = parse_target("redis://user:p%40ss@db.internal:6380/3")
    assert (target.mode, target.db, target.username, target.password) == ("single", 3, "user", "p@ss")
    assert target.describe() == "redis://db.internal:6380/3"  # no password
    assert parse_target("unix:///run/redis.sock?db=2").db == 2
    assert parse_target("rediss://h:1/0").tls


def test_cluster_takes_several_seeds_in_either_form() -> None:
    short = parse_target("redis://:secret@a:7000,b:7001, c:7002", cluster=True)
    long = parse_target("redis://:secret@a:7000,redis://b:7001,redis://c:7002", cluster=True)
    assert short.nodes == long.nodes == (("a", 7000), ("b", 7001), ("c", 7002))
    assert short.password == "secret"
    assert short.node_url("b", 7001) == "redis://:secret@b:7001/0"
    assert parse_target("redis://a:7000", cluster=True).nodes == (("a", 7000),)


def test_sentinel_in_celerys_form() -> None:
    target = parse_target(
        "sentinel://:pw@s1:26379/2;sentinel://s2:26380/2;sentinel://s3", sentinel_master="mymaster"
    )
    assert target.mode == "sentinel" and target.master == "mymaster"
    assert target.nodes == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert target.node_url("10.0.0.9", 6379) == "redis://:pw@10.0.0.9:6379/2"
    assert "pw" not in target.describe()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"JOBWIRE_REDIS_URL": "http://x:1"}, "is not a Redis URL"),
        ({"JOBWIRE_REDIS_URL": "redis-sentinel://x"}, "is not a Redis URL"),
        ({"JOBWIRE_REDIS_URL": "sentinel://s1:26379"}, "JOBWIRE_REDIS_SENTINEL_MASTER"),
        ({"JOBWIRE_REDIS_URL": "redis://a:1", "JOBWIRE_REDIS_SENTINEL_MASTER": "m"}, "not a sentinel://"),
        ({"JOBWIRE_REDIS_URL": "redis://a:1,b:2"}, "JOBWIRE_REDIS_CLUSTER=1"),
        ({"JOBWIRE_REDIS_URL": "redis://a:1/4", "JOBWIRE_REDIS_CLUSTER": "1"}, "database 0 only"),
        ({"JOBWIRE_REDIS_URL": "redis://a:port"}, "no valid port"),
        ({"JOBWIRE_REDIS_URL": "redis://u:topsecret"}, "no valid port"),
        ({"JOBWIRE_REDIS_URL": "redis://:topsecret@a:1/x"}, "must be a number"),
        (
            {"JOBWIRE_REDIS_URL": "redis://a:1,sentinel://b:2", "JOBWIRE_REDIS_CLUSTER": "1"},
            "must use redis://",
        ),
    ],
)
def test_a_wrong_url_is_one_line_naming_the_variable(
    env: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env()
    message = str(caught.value)
    assert message.startswith("JOBWIRE_REDIS_URL ") and says in message
    assert "\n" not in message and "topsecret" not in message


def _slots(*ranges: tuple[int, int, str]) -> list[list[object]]:
    reply: list[list[object]] = []
    for start, end, node in ranges:
        host, port = node.split(":")
        reply.append([start, end, [host.encode(), int(port), b"id"], [b"10.0.0.9", 7100, b"rid"]])
    return reply


def test_slot_map_from_cluster_slots() -> None:
    third = REDIS_CLUSTER_HASH_SLOTS // 3
    reply = _slots((0, third, "a:1"), (third + 1, 2 * third, "b:2"), (2 * third + 1, 16383, ":3"))
    smap = SlotMap.from_cluster_slots(reply, asked_host="c")
    assert smap.primaries == {"a:1", "b:2", "c:3"}  # an empty host is the node asked
    assert smap.covered and smap.nodes[-1] == "10.0.0.9:7100"  # replicas last
    channel = "jobwire:{job-1}:live"
    slot = key_slot(channel.encode())
    assert smap.owner(channel) == smap.owners[slot]
    assert not SlotMap.from_cluster_slots(_slots((0, 100, "a:1")), "a").covered


@given(
    before=st.lists(st.sampled_from(["a:1", "b:2", "c:3"]), min_size=8, max_size=8),
    after=st.lists(st.sampled_from(["a:1", "b:2", "c:3", "r:4", ""]), min_size=8, max_size=8),
    jobs=st.lists(st.text(alphabet="abcdefgh0123456789", min_size=1, max_size=6), max_size=30, unique=True),
)
def test_moves_put_every_channel_on_its_new_primary(
    before: list[str], after: list[str], jobs: list[str]
) -> None:
    """Whatever the old and new maps: after the moves each channel sits on its slot's new
    primary, or, where the slot has none yet, stays where it was."""
    span = REDIS_CLUSTER_HASH_SLOTS // 8 + 1

    def expand(owners: list[str]) -> SlotMap:
        return SlotMap(tuple(owners[slot // span] for slot in range(REDIS_CLUSTER_HASH_SLOTS)), ())

    old, new = expand(before), expand(after)
    channels = [f"jobwire:{{{job}}}:live" for job in jobs]
    placed: dict[str, list[str]] = {}
    for channel in channels:
        placed.setdefault(old.owner(channel), []).append(channel)
    planned = moves(placed, new)
    for channel in channels:
        where = planned[channel][1] if channel in planned else old.owner(channel)
        assert where == (new.owner(channel) or old.owner(channel))
        if channel in planned:
            assert planned[channel][0] == old.owner(channel) != where


def test_a_password_may_hold_the_separators() -> None:
    assert parse_target("redis://:pa,ss@h:1/0").password == "pa,ss"
    target = parse_target("redis://u:p;w,x@a:1,b:2", cluster=True)
    assert (target.password, target.nodes) == ("p;w,x", (("a", 1), ("b", 2)))
