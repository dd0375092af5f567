"""Time as the domain keeps it: integer milliseconds since the Unix epoch, UTC.

The ledger never reads a clock; callers pass `now_ms`. These helpers convert at
the edges (Postgres timestamps, RFC 3339 strings in the API).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

MS_PER_SECOND = 1_000
MS_PER_MINUTE = 60_000


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
