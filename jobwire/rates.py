"""Rate strings, as Celery writes them (`"100/m"`), checked and scaled without surprises.

Celery's `rate()` takes `"0/m"` as *unlimited* and cannot say `"0.5/m"` in a unit a worker
shows well, so a manager that halves `"1/m"` with `int()` turns a limit into no limit.
Here a rate is parsed strictly, and scaling never rounds to zero: it moves to a finer
unit (`"1/m"` × 0.5 → `"30/h"`), or clamps to the smallest real rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from jobwire.protocol import JobwireError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([smh])\s*$")
MIN_PER_SECOND = 1 / 86400  # one a day: the slowest rate jobwire will set


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` per `unit` (s, m or h)."""

    count: float
    unit: str

    @property
    def per_second(self) -> float:
        return self.count / UNITS[self.unit]

    def __str__(self) -> str:
        count = int(self.count) if float(self.count).is_integer() else self.count
        return f"{count}/{self.unit}"

    def scaled(self, factor: float) -> Rate:
        """This rate × `factor`, never unlimited by rounding: in the first unit (s, m, h)
        where the count is at least 1, clamped to one a day at the slowest."""
        if not math.isfinite(factor) or factor <= 0:
            raise JobwireError("invalid_request", f"factor must be a number > 0, got {factor!r}")
        per_second = max(self.per_second * factor, MIN_PER_SECOND)
        for unit in ("s", "m", "h"):
            count = per_second * UNITS[unit]
            if count >= 1 or unit == "h":
                return Rate(round(count, 3), unit)
        raise AssertionError("unreachable")


def parse_rate(value: object, *, field: str = "rate") -> Rate:
    """`"100/m"` → Rate(100, "m"). Refuses what Celery would misread: zero (Celery: no
    limit), negatives, other units (`"1/fortnight"`), junk."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise JobwireError(
            "invalid_request", f"{field} must look like '100/m' (a count per s, m or h), got {value!r:.40}"
        )
    count = float(match.group(1))
    if count <= 0:
        raise JobwireError(
            "invalid_request",
            f"{field} must be above zero (Celery reads '0/…' as no limit at all), got {value!r}",
        )
    return Rate(count, match.group(2))
