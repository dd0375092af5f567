"""Period arithmetic: calendar months, anchors on month ends, leap years, fixed durations, UTC days."""

from __future__ import annotations

from datetime import UTC, datetime

import hypothesis.strategies as st
import pytest
from hypothesis import given

from actors.periods import PeriodAnchor, add_months, calendar_month, period_containing, utc_day
from actors.times import from_datetime, to_datetime


def ms(*args: int) -> int:
    return from_datetime(datetime(*args, tzinfo=UTC))  # type: ignore[misc]


class TestCalendarMonths:
    @pytest.mark.parametrize(
        ("instant", "start", "end"),
        [
            (ms(2026, 11, 23, 10, 30), ms(2026, 11, 1), ms(2026, 12, 1)),
            (ms(2026, 12, 31, 23, 59, 59), ms(2026, 12, 1), ms(2027, 1, 1)),
            (ms(2028, 2, 29, 12), ms(2028, 2, 1), ms(2028, 3, 1)),
            (ms(2027, 2, 28, 23, 59), ms(2027, 2, 1), ms(2027, 3, 1)),
        ],
    )
    def test_calendar_month_contains_instant(self, instant: int, start: int, end: int) -> None:
        bounds = calendar_month(instant)
        assert (bounds.start_ms, bounds.end_ms) == (start, end)
        assert bounds.contains(instant)

    def test_month_start_belongs_to_its_own_month_and_end_is_exclusive(self) -> None:
        bounds = calendar_month(ms(2026, 12, 1))
        assert bounds.start_ms == ms(2026, 12, 1)
        assert not bounds.contains(bounds.end_ms)
        assert calendar_month(bounds.end_ms - 1) == bounds


class TestAddMonths:
    @pytest.mark.parametrize(
        ("start", "months", "expected"),
        [
            (ms(2026, 1, 31, 9), 1, ms(2026, 2, 28, 9)),
            (ms(2028, 1, 31, 9), 1, ms(2028, 2, 29, 9)),  # leap year
            (ms(2026, 1, 30), 1, ms(2026, 2, 28)),
            (ms(2026, 1, 29), 1, ms(2026, 2, 28)),
            (ms(2028, 1, 29), 1, ms(2028, 2, 29)),
            (ms(2026, 3, 31), 1, ms(2026, 4, 30)),
            (ms(2026, 12, 15), 1, ms(2027, 1, 15)),
            (ms(2026, 1, 31), -2, ms(2025, 11, 30)),
            (ms(2024, 2, 29), 12, ms(2025, 2, 28)),
        ],
    )
    def test_clamps_to_the_last_day_of_shorter_months(self, start: int, months: int, expected: int) -> None:
        assert add_months(start, months) == expected


class TestAnchors:
    def test_monthly_anchor_on_the_31st_does_not_drift(self) -> None:
        anchor = PeriodAnchor.from_subscription(ms(2026, 1, 31, 14, 5), ms(2026, 2, 28, 14, 5))
        assert anchor.months == 1
        starts = [period_containing(anchor, add_months(anchor.start_ms, k) + 1).start_ms for k in range(5)]
        assert [to_datetime(s).day for s in starts] == [31, 28, 31, 30, 31]
        assert period_containing(anchor, ms(2026, 3, 31, 14, 5)).start_ms == ms(2026, 3, 31, 14, 5)
        assert period_containing(anchor, ms(2026, 3, 31, 14, 4)).start_ms == ms(2026, 2, 28, 14, 5)

    @pytest.mark.parametrize("day", [29, 30, 31])
    def test_anchors_on_29th_to_31st_through_a_leap_february(self, day: int) -> None:
        anchor = PeriodAnchor.from_subscription(ms(2027, 12, day), add_months(ms(2027, 12, day), 1))
        february = period_containing(anchor, ms(2028, 2, 15))
        assert to_datetime(february.start_ms).date() == datetime(2028, 1, day).date()
        assert to_datetime(february.end_ms).date() == datetime(2028, 2, 29).date()
        march = period_containing(anchor, february.end_ms)
        assert march.start_ms == february.end_ms
        assert to_datetime(march.end_ms).date() == datetime(2028, 3, day).date()

    def test_yearly_subscription_steps_by_twelve_months(self) -> None:
        anchor = PeriodAnchor.from_subscription(ms(2024, 2, 29), ms(2025, 2, 28))
        assert anchor.months == 12
        assert period_containing(anchor, ms(2027, 6, 1)) == period_containing(anchor, ms(2027, 2, 28))
        assert (
            to_datetime(period_containing(anchor, ms(2028, 3, 1)).start_ms).date()
            == datetime(2028, 2, 29).date()
        )

    def test_fixed_duration_anchor(self) -> None:
        anchor = PeriodAnchor.from_subscription(ms(2026, 11, 2), ms(2026, 11, 9))  # a week
        assert anchor.duration_ms == 7 * 86_400_000
        bounds = period_containing(anchor, ms(2026, 11, 20, 3))
        assert (bounds.start_ms, bounds.end_ms) == (ms(2026, 11, 16), ms(2026, 11, 23))
        before = period_containing(anchor, ms(2026, 10, 30))
        assert (before.start_ms, before.end_ms) == (ms(2026, 10, 26), ms(2026, 11, 2))

    def test_utc_day(self) -> None:
        day = utc_day(ms(2026, 11, 23, 23, 59, 59))
        assert (day.start_ms, day.end_ms) == (ms(2026, 11, 23), ms(2026, 11, 24))


anchors = st.builds(
    lambda start, months: PeriodAnchor(start_ms=start, months=months),
    st.integers(min_value=ms(2000, 1, 1), max_value=ms(2100, 1, 1)),
    st.integers(min_value=1, max_value=12),
) | st.builds(
    lambda start, duration: PeriodAnchor(start_ms=start, duration_ms=duration),
    st.integers(min_value=ms(2000, 1, 1), max_value=ms(2100, 1, 1)),
    st.integers(min_value=1_000, max_value=400 * 86_400_000),
)
instants = st.integers(min_value=ms(1990, 1, 1), max_value=ms(2110, 1, 1))


@given(anchor=st.none() | anchors, instant=instants)
def test_periods_tile_time(anchor: PeriodAnchor | None, instant: int) -> None:
    """Each instant is in exactly one period, and consecutive periods meet with no gap."""
    bounds = period_containing(anchor, instant)
    assert bounds.contains(instant)
    assert period_containing(anchor, bounds.end_ms).start_ms == bounds.end_ms
    assert period_containing(anchor, bounds.start_ms - 1).end_ms == bounds.start_ms
    assert period_containing(anchor, bounds.start_ms) == bounds


def test_millisecond_round_trip() -> None:
    instant = ms(2026, 11, 23, 10, 30) + 123
    assert from_datetime(to_datetime(instant)) == instant
    assert to_datetime(instant).tzinfo is UTC


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        from_datetime(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("start", "end", "renewals"),
    [
        (ms(2027, 2, 28), ms(2027, 3, 31), ["2027-04-30", "2027-05-31", "2027-06-30"]),
        (ms(2027, 4, 30), ms(2027, 5, 31), ["2027-06-30", "2027-07-31", "2027-08-31"]),
        (ms(2024, 2, 29), ms(2024, 3, 31), ["2024-04-30", "2024-05-31", "2024-06-30"]),
        (ms(2027, 2, 28), ms(2027, 3, 29), ["2027-04-29", "2027-05-29", "2027-06-29"]),
    ],
)
def test_a_period_starting_on_a_clamped_month_end_keeps_its_true_anchor_day(
    start: int, end: int, renewals: list[str]
) -> None:
    """Billing sends [Feb 28, Mar 31) for a subscription anchored on the 31st: that is monthly."""
    anchor = PeriodAnchor.from_subscription(start, end)
    assert anchor.months == 1
    assert period_containing(anchor, start) == period_containing(anchor, end - 1)
    ends = []
    instant = end
    for _ in range(3):
        bounds = period_containing(anchor, instant)
        ends.append(to_datetime(bounds.end_ms).date().isoformat())
        instant = bounds.end_ms
    assert ends == renewals
