"""Latency as a histogram: what load-generator processes send back instead of every sample.

At 400,000 deliveries/s a list of every latency is millions of floats per process, and
pickling them back is work the load generator would do instead of reading. Buckets grow
by 2% (log scale), so a percentile read from them is within 1% of the true one, from
10 µs to hours, in a few hundred buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

_STEP = math.log(1.02)
_FLOOR_MS = 0.01


def bucket(ms: float) -> int:
    """The bucket of a latency in milliseconds (negative or tiny ones share the lowest)."""
    return int(math.log(ms if ms > _FLOOR_MS else _FLOOR_MS) / _STEP)


def value(index: int) -> float:
    """The middle of a bucket, in milliseconds."""
    return math.exp((index + 0.5) * _STEP)


class Histogram:
    """Counts per bucket; `add` is the hot path (one log and a dict update)."""

    __slots__ = ("counts",)

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: Counter[int] = Counter(counts or {})

    def add(self, ms: float) -> None:
        self.counts[int(math.log(ms if ms > _FLOOR_MS else _FLOOR_MS) / _STEP)] += 1

    def merge(self, others: Iterable[Histogram]) -> Histogram:
        for other in others:
            self.counts.update(other.counts)
        return self

    def __len__(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> float:
        """The latency below which a share `q` of the samples fall (NaN with no samples)."""
        total = len(self)
        if not total:
            return float("nan")
        rank, seen = min(total - 1, int(total * q)), 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen > rank:
                return value(index)
        raise AssertionError("unreachable")

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, doc: dict[str, int]) -> Histogram:
        return cls({int(k): v for k, v in doc.items()})
