"""`usage_holds`: one row per hold, upserted in batches (`persistence.batch`), guarded by `version`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import HoldRecord
from persistence.batch import INSTANT, Batch, BatchStatement, Row, Rows
from persistence.decode import Columns, draws, draws_text, instant_ms, optional_instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


def hold_from_row(row: Columns) -> HoldRecord:
    """A `usage_holds` row (at least the columns `HOLDS` declares) as the ledger takes it."""
    return HoldRecord(
        hold_id=row["hold_id"],
        user_id=row["user_id"],
        meter=row["meter"],
        amount=row["amount"],
        state=row["state"],
        reference=row["reference"],
        created_at_ms=instant_ms(row["created_at"], "usage_holds.created_at"),
        expires_at_ms=instant_ms(row["expires_at"], "usage_holds.expires_at"),
        version=row["version"],
        captured=row["captured"],
        released=row["released"],
        resolved_at_ms=optional_instant_ms(row["resolved_at"], "usage_holds.resolved_at"),
        draws=draws(row["draws"], "usage_holds.draws"),
        window_start_ms=optional_instant_ms(row["window_start"], "usage_holds.window_start"),
    )


def _hold_row(h: HoldRecord) -> Row:
    return (
        h.hold_id,
        h.user_id,
        h.meter,
        h.amount,
        h.state,
        h.captured,
        h.released,
        h.reference,
        h.created_at_ms,
        h.expires_at_ms,
        h.resolved_at_ms,
        draws_text(h.draws),
        h.window_start_ms,
        h.version,
    )


HOLDS = Rows(
    "holds",
    (
        ("hold_id", "text"),
        ("user_id", "text"),
        ("meter", "text"),
        ("amount", "bigint"),
        ("state", "text"),
        ("captured", "bigint"),
        ("released", "bigint"),
        ("reference", "text"),
        ("created_at", INSTANT),
        ("expires_at", INSTANT),
        ("resolved_at", INSTANT),
        ("draws", "jsonb"),
        ("window_start", INSTANT),
        ("version", "bigint"),
    ),
    _hold_row,
)

# What a read of whole rows selects (`hold_from_row` reads them).
_COLUMNS = ", ".join(HOLDS.names)

_UPSERT_HOLDS = BatchStatement(
    HOLDS,
    """
    insert into usage_holds as h ({columns})
    select {columns} from {rows}
    on conflict (hold_id) do update
        set state = excluded.state,
            captured = excluded.captured,
            released = excluded.released,
            expires_at = excluded.expires_at,
            resolved_at = excluded.resolved_at,
            window_start = excluded.window_start,
            version = excluded.version,
            updated_at = now()
        where h.version < excluded.version and h.user_id = excluded.user_id
    """,
)


async def upsert_holds(batch: Batch, *, holds: Sequence[HoldRecord]) -> None:
    await batch.execute(_UPSERT_HOLDS, holds)


async def fetch_hold(connection: Connection, *, user_id: str, hold_id: str) -> HoldRecord | None:
    row = await connection.fetchrow(
        f"select {_COLUMNS} from usage_holds where hold_id = $1 and user_id = $2", hold_id, user_id
    )
    return hold_from_row(row) if row is not None else None
