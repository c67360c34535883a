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
