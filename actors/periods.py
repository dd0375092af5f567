"""Usage periods: half-open intervals [start, end) in epoch milliseconds.

A period is a calendar month in UTC. (Billing-anchored periods, which follow a
subscription's own start day, build on this module in a later issue.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from actors.times import from_datetime, to_datetime


@dataclass(frozen=True, slots=True)
class PeriodBounds:
    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        assert self.start_ms < self.end_ms, "a period must have a positive length"

    def contains(self, instant_ms: int) -> bool:
        return self.start_ms <= instant_ms < self.end_ms


def _month_start(year: int, month: int) -> datetime:
    return datetime(year, month, 1, tzinfo=UTC)


def calendar_month(instant_ms: int) -> PeriodBounds:
    """The UTC calendar month containing `instant_ms`."""
    moment = to_datetime(instant_ms)
    start = _month_start(moment.year, moment.month)
    end = (
        _month_start(moment.year + 1, 1)
        if moment.month == 12
        else _month_start(moment.year, moment.month + 1)
    )
    return PeriodBounds(from_datetime(start), from_datetime(end))
