"""Reading rows back: what the domain takes of a stored value, or `UnreadableRow`.

Rows written by this version hold only what the gateway let in (times between 2000 and 2200,
`actors.times`). An older version could write more: a time Postgres keeps as `-infinity`, the
year 1, a period without an end. Such a value is refused here, by name, so the user it belongs to
is refused (`PostgresStore.load` returns `UnreadableLedger` for them) instead of a ledger being
built on it, or a shard failing on it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Protocol

from actors.times import checked_instant
from persistence.errors import PersistenceError


class Columns(Protocol):
    """A row's values by column name: an `asyncpg.Record`, or a dict of an anonymous record's
    fields (`persistence.ledgers`)."""

    def __getitem__(self, name: str, /) -> Any: ...


class UnreadableRow(PersistenceError):
    """A stored row holds a value the ledger cannot take; the message names the column."""


def instant_ms(value: datetime, column: str) -> int:
    """Epoch milliseconds of a stored time, if it is one the ledger takes."""
    try:
        return checked_instant(value)
    except (ValueError, OverflowError) as exc:
        raise UnreadableRow("read", f"{column} holds {value!r}: {exc}") from None


def optional_instant_ms(value: datetime | None, column: str) -> int | None:
    return instant_ms(value, column) if value is not None else None


def draws(value: str | None, column: str) -> tuple[tuple[int, int, int], ...]:
    """What a held tail or a minute hold holds, as stored (jsonb text: [[period start ms,
    allowance ms, purchased ms], ...]); None is nothing."""
    if value is None:
        return ()
    try:
        return tuple(
            (int(start), int(allowance), int(purchased)) for start, allowance, purchased in json.loads(value)
        )
    except (ValueError, TypeError) as exc:
        raise UnreadableRow("read", f"{column} holds {value!r}: {exc}") from None


def draws_text(held: tuple[tuple[int, int, int], ...]) -> str | None:
    return json.dumps([list(draw) for draw in held]) if held else None
