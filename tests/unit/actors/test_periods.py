"""Calendar-month periods in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from actors.periods import calendar_month
from actors.times import from_datetime, to_datetime


def ms(*args: int) -> int:
    return from_datetime(datetime(*args, tzinfo=UTC))  # type: ignore[misc]


@pytest.mark.parametrize(
    ("instant", "start", "end"),
    [
        (ms(2026, 11, 23, 10, 30), ms(2026, 11, 1), ms(2026, 12, 1)),
        (ms(2026, 12, 31, 23, 59, 59), ms(2026, 12, 1), ms(2027, 1, 1)),
        (ms(2028, 2, 29, 12), ms(2028, 2, 1), ms(2028, 3, 1)),
        (ms(2027, 2, 28, 23, 59), ms(2027, 2, 1), ms(2027, 3, 1)),
    ],
)
def test_calendar_month_contains_instant(instant: int, start: int, end: int) -> None:
    bounds = calendar_month(instant)
    assert (bounds.start_ms, bounds.end_ms) == (start, end)
    assert bounds.contains(instant)


def test_month_start_belongs_to_its_own_month_and_end_is_exclusive() -> None:
    bounds = calendar_month(ms(2026, 12, 1))
    assert bounds.start_ms == ms(2026, 12, 1)
    assert not bounds.contains(bounds.end_ms)
    assert calendar_month(bounds.end_ms - 1) == bounds


def test_millisecond_round_trip() -> None:
    instant = ms(2026, 11, 23, 10, 30) + 123
    assert from_datetime(to_datetime(instant)) == instant
    assert to_datetime(instant).tzinfo is UTC


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        from_datetime(datetime(2026, 1, 1))
