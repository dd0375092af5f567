"""Usage periods: half-open intervals [start, end) in epoch milliseconds.

Without an anchor a period is a calendar month in UTC. With one, periods
follow the subscription billing supplied: every period has the anchor's
length, either a whole number of calendar months (a subscription that started
on the 31st renews on the last day of shorter months and on the 31st again
after them) or a fixed duration (a week, or the short periods tests use).

Every period is computed from the anchor itself, never by stepping from the
previous one, so month-end clamping never drifts (31 → 28 → 28 …).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from actors.times import from_datetime, to_datetime

# Month-stepped anchors cover monthly up to yearly subscriptions.
MONTHS_PER_PERIOD_MAX = 12
MS_PER_DAY = 86_400_000


@dataclass(frozen=True, slots=True)
class PeriodBounds:
    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        assert self.start_ms < self.end_ms, "a period must have a positive length"

    def contains(self, instant_ms: int) -> bool:
        return self.start_ms <= instant_ms < self.end_ms

    @property
    def length_ms(self) -> int:
        return self.end_ms - self.start_ms


@dataclass(frozen=True, slots=True)
class PeriodAnchor:
    """Where billing periods start: `start_ms`, then every `months` months or every `duration_ms`."""

    start_ms: int
    months: int = 0
    duration_ms: int = 0

    def __post_init__(self) -> None:
        assert (self.months > 0) != (self.duration_ms > 0), "exactly one of months and duration_ms"
        assert 0 <= self.months <= MONTHS_PER_PERIOD_MAX, "months out of range"

    @classmethod
    def from_subscription(cls, start_ms: int, end_ms: int) -> PeriodAnchor:
        """The anchor of a subscription period: month-stepped when [start, end) is whole months.

        A period that starts on a clamped month end ([Feb 28, Mar 31), anchored on the 31st) is
        whole months counted back from its end, so the end carries the anchor's true day.
        """
        assert start_ms < end_ms, "a subscription period must have a positive length"
        for months in range(1, MONTHS_PER_PERIOD_MAX + 1):
            if add_months(start_ms, months) == end_ms:
                return cls(start_ms=start_ms, months=months)
            if add_months(end_ms, -months) == start_ms:
                return cls(start_ms=end_ms, months=months)
        return cls(start_ms=start_ms, duration_ms=end_ms - start_ms)

    @property
    def shortest_period_ms(self) -> int:
        return self.duration_ms or 28 * MS_PER_DAY * self.months


def add_months(instant_ms: int, months: int) -> int:
    """The same day and time `months` months later (or earlier), clamped to the month's last day."""
    moment = to_datetime(instant_ms)
    month_index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(month_index, 12)
    month += 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return from_datetime(moment.replace(year=year, month=month, day=day))


def calendar_month(instant_ms: int) -> PeriodBounds:
    """The UTC calendar month containing `instant_ms`."""
    moment = to_datetime(instant_ms)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    start_ms = from_datetime(start)
    return PeriodBounds(start_ms, add_months(start_ms, 1))


def utc_day(instant_ms: int) -> PeriodBounds:
    """The UTC day containing `instant_ms` (the window of `day` count meters)."""
    start = to_datetime(instant_ms).replace(hour=0, minute=0, second=0, microsecond=0)
    return PeriodBounds(from_datetime(start), from_datetime(start + timedelta(days=1)))


def period_containing(anchor: PeriodAnchor | None, instant_ms: int) -> PeriodBounds:
    """The period (calendar month, or the anchor's) that contains `instant_ms`."""
    if anchor is None:
        return calendar_month(instant_ms)
    if anchor.duration_ms:
        index = (instant_ms - anchor.start_ms) // anchor.duration_ms  # floor: works before the anchor too
        start = anchor.start_ms + index * anchor.duration_ms
        return PeriodBounds(start, start + anchor.duration_ms)
    # Month-stepped: estimate the index from the calendar, then correct by at most a step each way.
    origin = to_datetime(anchor.start_ms)
    moment = to_datetime(instant_ms)
    elapsed_months = (moment.year - origin.year) * 12 + (moment.month - origin.month)
    index = elapsed_months // anchor.months
    while add_months(anchor.start_ms, index * anchor.months) > instant_ms:
        index -= 1
    while add_months(anchor.start_ms, (index + 1) * anchor.months) <= instant_ms:
        index += 1
    return PeriodBounds(
        add_months(anchor.start_ms, index * anchor.months),
        add_months(anchor.start_ms, (index + 1) * anchor.months),
    )
