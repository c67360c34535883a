"""Rate strings: strict parsing, and scaling that never becomes "unlimited"."""

from __future__ import annotations

import pytest
from celery.utils.time import rate as celery_rate
from hypothesis import given
from hypothesis import strategies as st

from jobwire.protocol import JobwireError
from jobwire.rates import MIN_PER_SECOND, parse_rate


@pytest.mark.parametrize(
    ("rate", "factor", "scaled"),
    [
        ("1/m", 0.5, "30/h"),
        ("100/m", 0.5, "50/m"),
        ("10/s", 0.5, "5/s"),
        ("1/s", 0.3, "18/m"),
        ("3/h", 0.1, "0.3/h"),
    ],
)
def test_scaling_moves_to_a_finer_unit(rate: str, factor: float, scaled: str) -> None:
    assert str(parse_rate(rate).scaled(factor)) == scaled


@given(count=st.integers(1, 10_000), unit=st.sampled_from("smh"), factor=st.floats(1e-9, 100))
def test_scaled_rate_is_real_and_close(count: int, unit: str, factor: float) -> None:
    """Whatever the factor, the result is a limit Celery reads as one (never 0 = unlimited),
    and within rounding of the exact product (or clamped to one a day)."""
    rate = parse_rate(f"{count}/{unit}")
    scaled = rate.scaled(factor)
    assert celery_rate(str(scaled)) > 0
    exact = max(rate.per_second * factor, MIN_PER_SECOND)
    assert abs(scaled.per_second - exact) <= exact * 0.01 + 0.0005 / 3600


@pytest.mark.parametrize("bad", ["abc", "-1/s", "0/m", "1/fortnight", "", "1/", "/m", 5, None, "1e3/s"])
def test_bad_rates_are_refused(bad: object) -> None:
    with pytest.raises(JobwireError) as err:
        parse_rate(bad)
    assert err.value.status == 422


def test_bad_factor_is_refused() -> None:
    for factor in (0, -1, float("nan"), float("inf")):
        with pytest.raises(JobwireError):
            parse_rate("1/m").scaled(factor)
