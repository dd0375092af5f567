"""`usage_meters`: each user's count meters in their current window (write-behind, guarded by version)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import MeterRecord
from persistence.batch import INSTANT, Batch, BatchStatement, Row, Rows
from persistence.decode import Columns, instant_ms

if TYPE_CHECKING:
    pass


def _meter_row(m: MeterRecord) -> Row:
    return (m.user_id, m.meter, m.window_start_ms, m.window_end_ms, m.used, m.version)


METERS = Rows(
    "meters",
    (
        ("user_id", "text"),
        ("meter", "text"),
        ("window_start", INSTANT),
        ("window_end", INSTANT),
        ("used", "bigint"),
        ("version", "bigint"),
    ),
    _meter_row,
)

_UPSERT_METERS = BatchStatement(
    METERS,
    """
    insert into usage_meters as m ({columns})
    select {columns} from {rows}
    on conflict (user_id, meter) do update
        set window_start = excluded.window_start,
            window_end = excluded.window_end,
            used = excluded.used,
            version = excluded.version,
            updated_at = now()
        where m.version < excluded.version
    """,
)


async def upsert_meters(batch: Batch, *, meters: Sequence[MeterRecord]) -> None:
    await batch.execute(_UPSERT_METERS, meters)


def meter_from_row(row: Columns) -> MeterRecord:
    """A `usage_meters` row as the ledger takes it."""
    return MeterRecord(
        user_id=row["user_id"],
        meter=row["meter"],
        window_start_ms=instant_ms(row["window_start"], "usage_meters.window_start"),
        window_end_ms=instant_ms(row["window_end"], "usage_meters.window_end"),
        used=row["used"],
        version=row["version"],
    )
