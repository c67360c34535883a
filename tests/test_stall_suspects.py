"""The stall watch checks its suspects, not every connection each second (issue 20,
candidate 5): a blocked send makes its feed a suspect at once, an unanswered ping on a
sweep of every feed (every `timeout` at most), and a feed that recovers leaves the set.
Which clients are closed, and when, is pinned end to end by tests/test_stalls.py."""

from __future__ import annotations

from jobwire.protocol import Keys
from jobwire.server.auth import Principal
from jobwire.server.feed import Feed
from jobwire.server.stalls import StallWatch


def _feed() -> Feed:
    # No hub or store: these feeds watch nothing, only their sends and pings are looked at.
    return Feed(None, None, Keys("jobwire:"), Principal("someone", "t"), queue_limit=10, max_jobs=10)  # type: ignore[arg-type]


def test_only_suspects_are_checked_between_sweeps() -> None:
    watch = StallWatch(10.0)
    quiet, blocked, pinged, recovers = _feed(), _feed(), _feed(), _feed()
    for feed in (quiet, blocked, pinged, recovers):
        watch.add(feed)
    assert watch.suspects == 0
    blocked.sending_since = 100.0  # a send blocks: a suspect at once
    recovers.sending_since = 100.0
    pinged.ping_since = lambda: 100.0  # the transport's hook: a ping unanswered since 100
    assert watch.suspects == 2

    recovers.sending_since = None
    watch.check(105.0, sweep=False)  # a tick: nothing stalled yet; `recovers` leaves
    assert watch.suspects == 1 and blocked.too_slow is None

    watch.check(110.5, sweep=False)  # past the timeout: the blocked send is found
    assert blocked.too_slow is not None and "accepted nothing for 10s" in blocked.too_slow
    # Not a suspect until a sweep sees its ping pending (in a running watch, a sweep
    # comes at most `timeout` after the last, so before its ping is `timeout` old).
    assert pinged.too_slow is None
    assert watch.suspects == 0

    watch.check(110.6, sweep=True)
    assert pinged.too_slow is not None and "answered no ping" in pinged.too_slow
    assert quiet.too_slow is None and recovers.too_slow is None
    assert watch.suspects == 0


def test_a_pinged_feed_found_by_a_sweep_is_checked_on_every_tick() -> None:
    watch = StallWatch(10.0)
    pinged = _feed()
    watch.add(pinged)
    since: float | None = 100.0
    pinged.ping_since = lambda: since
    watch.check(101.0, sweep=True)
    assert watch.suspects == 1 and pinged.too_slow is None
    watch.check(110.5, sweep=False)
    assert pinged.too_slow is not None


def test_a_pong_takes_a_feed_out_of_the_set() -> None:
    watch = StallWatch(10.0)
    pinged = _feed()
    watch.add(pinged)
    since: float | None = 100.0
    pinged.ping_since = lambda: since
    watch.check(101.0, sweep=True)
    since = None  # the pong came
    watch.check(102.0, sweep=False)
    assert watch.suspects == 0 and pinged.too_slow is None
