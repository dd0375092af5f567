"""Time as the domain keeps it: integer milliseconds since the Unix epoch, UTC.

The ledger never reads a clock; callers pass `now_ms`. These helpers convert at
the edges (Postgres timestamps, RFC 3339 strings in the API).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

MS_PER_SECOND = 1_000
MS_PER_MINUTE = 60_000

# Every time that enters the system (request bodies, billing events, tokens) lies in
# [EARLIEST_MS, LATEST_MS): what a ledger computes with them (periods, alarms) and what Postgres
# stores of them stay ordinary dates. A stored time outside it (written by an older version) makes
# its user unreadable, not its shard (`persistence`).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
EARLIEST_MS = 946_684_800_000
LATEST_MS = 7_258_118_400_000


def wall_clock_ms() -> int:
    """The real clock, in integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def to_datetime(ms: int) -> datetime:
    """An aware UTC datetime for an epoch-millisecond instant."""
    seconds, millis = divmod(ms, MS_PER_SECOND)
    return datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=millis * 1_000)


def from_datetime(value: datetime) -> int:
    """Epoch milliseconds for an aware datetime (sub-millisecond parts are truncated)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: the ledger only accepts timezone-aware times")
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * MS_PER_SECOND + delta.microseconds // 1_000


def checked_instant(value: datetime) -> int:
    """Epoch milliseconds of a time from outside, if it is timezone-aware and within
    [EARLIEST, LATEST); `ValueError` (with what is wrong) otherwise."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("a time must carry its timezone (e.g. 2026-11-01T00:00:00Z)")
    try:
        ms = from_datetime(value)
    except OverflowError:
        raise ValueError("a time must lie between 2000-01-01 and 2200-01-01 UTC") from None
    return checked_ms(ms)


def checked_ms(ms: int) -> int:
    """`ms` if it lies within [EARLIEST_MS, LATEST_MS); `ValueError` otherwise."""
    if not EARLIEST_MS <= ms < LATEST_MS:
        raise ValueError("a time must lie between 2000-01-01 and 2200-01-01 UTC")
    return ms


def minutes_to_ms(minutes: float) -> int:
    """Whole milliseconds for a (possibly fractional) number of minutes."""
    return round(minutes * MS_PER_MINUTE)


def to_minutes(ms: int) -> float:
    """Minutes as the API shows them: two decimals."""
    return round(ms / MS_PER_MINUTE, 2)


def rfc3339(value: datetime) -> str:
    """How the API writes times: RFC 3339 in UTC with a `Z`, to the millisecond the ledger keeps.
    Whole seconds print without a fraction."""
    spec = "seconds" if value.microsecond == 0 else "milliseconds"
    return value.isoformat(timespec=spec).replace("+00:00", "Z")
