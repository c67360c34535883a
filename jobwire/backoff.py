"""Exponential backoff with jitter: the one schedule every jobwire retry loop follows."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff(minimum: float, maximum: float, *, factor: float = 2.0) -> Iterator[float]:
    """Delays in seconds: `minimum`, then ×`factor` each time up to `maximum`, each scaled
    by a random 0.5-1.5.

    The jitter matters more than the growth: when a server restarts, every client that
    lost it retries at once, and without jitter they keep arriving in lockstep. Start a
    new generator after a success, so the next outage begins at `minimum` again.
    """
    delay = minimum
    while True:
        yield delay * (0.5 + random.random())
        delay = min(delay * factor, maximum)


def not_before(retry_after: float | None, delay: float) -> float:
    """`delay`, or a moment past `retry_after` (the server's `Retry-After`) if that is
    later: between 1 and 1.5 times it, so clients refused together do not all come back
    in the same instant."""
    if retry_after is None:
        return delay
    return max(delay, retry_after * (1 + random.random() / 2))
